"""Stand-ins for what devices are given: an IrqRouter that records, a virtio device that records its lifecycle."""
from pyhv.devices.irq import IrqRouter
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice


class FakeRouter(IrqRouter):
    """Records MSI routing, irqfd binding and ioeventfds instead of issuing KVM ioctls."""

    def __init__(self, any_length=False):
        self.ioeventfd_any_length = any_length
        self.msi_log = []           # ("route", gsi, address, data) | ("unroute", gsi) | ("bind"|"unbind", fd, gsi)
        self.ioeventfd_log = []     # ("assign"|"deassign", fd, addr, len)
        self.lines = {}
        self.routes = {}
        self._next_gsi = 24

    def set_irq_line(self, irq, level):
        self.lines[irq] = level

    def allocate_gsi(self):
        self._next_gsi += 1
        return self._next_gsi - 1

    def route_msi(self, gsi, address, data):
        if self.routes.get(gsi) != (address, data):      # KVM's router sends only changes, too
            self.routes[gsi] = (address, data)
            self.msi_log.append(("route", gsi, address, data))

    def unroute(self, gsi):
        if self.routes.pop(gsi, None) is not None:
            self.msi_log.append(("unroute", gsi))

    def bind_irqfd(self, eventfd, gsi):
        self.msi_log.append(("bind", eventfd, gsi))

    def unbind_irqfd(self, eventfd, gsi):
        self.msi_log.append(("unbind", eventfd, gsi))

    def add_ioeventfd(self, eventfd, addr, length):
        self.ioeventfd_log.append(("assign", eventfd, addr, length))

    def remove_ioeventfd(self, eventfd, addr, length):
        self.ioeventfd_log.append(("deassign", eventfd, addr, length))


class FakeBackend(VirtioDevice):
    """A two-queue virtio device that records activate/reset/config writes (and can be told to fail)."""
    device_type = 4
    features = VIRTIO_F_VERSION_1 | 1 << 3
    num_queues = 2
    queue_max_sizes = (16, 32)
    name = "fake"

    def __init__(self, config=b""):
        super().__init__()
        self.config = config
        self.activated = []
        self.resets = 0
        self.config_writes = []
        self.fail_activate = None
        self.on_reset = None

    def config_bytes(self):
        return self.config

    def config_write(self, offset, data):
        self.config_writes.append((offset, data))

    def activate(self, mem, features, queues):
        if self.fail_activate:
            raise self.fail_activate
        self.activated.append((features, queues))

    def reset(self):
        self.resets += 1
        if self.on_reset:
            self.on_reset()
