"""Virtio devices: the split virtqueue (queue.py) and the device models built on it.

Every device service maps the guest RAM memfd itself and treats everything the
guest wrote as untrusted: rings, descriptors and indices are checked against
guest memory (devices.guest_memory.GuestMemory) before use.
"""
