"""Host ends of virtio-net: TAP and switch ports (ports.py), and the learning switch process (switch.py)."""
