"""PCI bus 0: config space of a function (config_space.py) and the root with config mechanism #1 and the MMIO window (root.py)."""
