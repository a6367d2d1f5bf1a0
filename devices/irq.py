"""IrqRouter: what a device may ask of the VM's interrupt and notification wiring (the worker implements it over KVM).

Devices never see KVM.  A PCI transport routes its MSI-X vectors to GSIs,
binds irqfds to them and places its notify ioeventfds through this
interface; a legacy device raises its ISA line.  The worker's implementation
is vcpu_worker/irq_router.py; tests hand devices a fake that records calls.
"""


class IrqRouter:
    ioeventfd_any_length = False     # KVM_CAP_IOEVENTFD_ANY_LENGTH: one ioeventfd matches every write width

    def set_irq_line(self, irq, level):
        """Raise (True) or lower an ISA interrupt line (IOAPIC pin and PIC input `irq`)."""
        raise NotImplementedError("this IrqRouter has no ISA lines")

    def allocate_gsi(self):
        """A GSI of its own for one MSI vector."""
        raise NotImplementedError("this IrqRouter routes no MSIs")

    def route_msi(self, gsi, address, data):
        """GSI `gsi` delivers the MSI (address, data) from now on."""
        raise NotImplementedError("this IrqRouter routes no MSIs")

    def unroute(self, gsi):
        raise NotImplementedError("this IrqRouter routes no MSIs")

    def bind_irqfd(self, eventfd, gsi):
        """Writes to `eventfd` inject `gsi` (a count already pending is injected now)."""
        raise NotImplementedError("this IrqRouter binds no irqfds")

    def unbind_irqfd(self, eventfd, gsi):
        """Detach the irqfd; later writes accumulate in the eventfd's counter."""
        raise NotImplementedError("this IrqRouter binds no irqfds")

    def add_ioeventfd(self, eventfd, addr, length):
        """Guest writes of `length` bytes (0: any) to MMIO `addr` bump `eventfd` without leaving the kernel."""
        raise NotImplementedError("this IrqRouter places no ioeventfds")

    def remove_ioeventfd(self, eventfd, addr, length):
        raise NotImplementedError("this IrqRouter places no ioeventfds")

    def counters(self):
        return {}
