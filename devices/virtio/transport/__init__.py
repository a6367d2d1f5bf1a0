"""The virtio-pci transport: common configuration and its status machine, MSI-X, and the PCI function that holds them."""
