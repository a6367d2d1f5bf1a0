"""KvmIrqRouter: the devices' IrqRouter over one KVM VM (ISA lines, the GSI routing table, irqfds, ioeventfds).

KVM_SET_GSI_ROUTING replaces the whole table, so every update re-sends the
in-kernel irqchip's defaults for GSIs 0-23 (IOAPIC pins 0-23, plus the PIC
for 0-15: KVM's default_routing) followed by one MSI entry per routed GSI;
without the defaults the serial port's IRQ 4 and the PIT would stop
working.  MSI GSIs are allocated from 24 upward.  An irqfd bound to a GSI
delivers whatever MSI the route currently names (KVM re-reads routes on
update).  Thread-safe: vCPU threads program MSI-X tables concurrently.
"""
import threading

from pyhv.devices.irq import IrqRouter
from pyhv.vcpu_worker._kvm import lib

FIRST_MSI_GSI = 24             # 0-23: IOAPIC pins (0-15 also the PIC)
IOAPIC_PINS = 24


def default_irqchip_routes():
    """KVM's default GSI routes for an in-kernel irqchip (arch/x86/kvm default_routing)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append((gsi, "irqchip", lib.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < 16:
            chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, "irqchip", chip, gsi % 8))
    return routes


class KvmIrqRouter(IrqRouter):
    def __init__(self, vm):
        self.vm = vm
        self.ioeventfd_any_length = bool(vm.kvm.check_extension("KVM_CAP_IOEVENTFD_ANY_LENGTH"))
        self._lock = threading.Lock()
        self._next_gsi = FIRST_MSI_GSI
        self._msi = {}                        # gsi -> (address, data)
        self._defaults = default_irqchip_routes()
        self.updates = 0                      # KVM_SET_GSI_ROUTING calls

    def set_irq_line(self, irq, level):
        self.vm.irq_line(irq, level)

    def allocate_gsi(self):
        with self._lock:
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def route_msi(self, gsi, address, data):
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit()

    def unroute(self, gsi):
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._commit()

    def _commit(self):
        self.updates += 1
        self.vm.set_gsi_routing(self._defaults + [(g, "msi", a, d) for g, (a, d) in sorted(self._msi.items())])

    def bind_irqfd(self, eventfd, gsi):
        self.vm.irqfd(eventfd, gsi)

    def unbind_irqfd(self, eventfd, gsi):
        self.vm.irqfd(eventfd, gsi, deassign=True)

    def add_ioeventfd(self, eventfd, addr, length):
        self.vm.ioeventfd(eventfd, addr, length)

    def remove_ioeventfd(self, eventfd, addr, length):
        self.vm.ioeventfd(eventfd, addr, length, deassign=True)

    def counters(self):
        return {"gsi_routing_updates": self.updates, "msi_routes": len(self._msi)}
