"""The devices of one guest, built from its config: legacy PC devices, PCI bus 0 and its virtio devices, owned together.

Every guest has COM1 (IRQ 4), the i8042 (its reset line ends the VM), the
CMOS RTC, the POST port and the exit port (answered in the C run loop) and
the debug page; its config's DeviceSpecs (devices/virtio/kinds.py) become
virtio-pci functions in slot order, and its PluginSpecs plugin processes
(devices/plugin/), each on ranges no built-in device, KVM or RAM holds.  A virtio model runs in a device-service
process behind a ServiceProxy, started by the `launcher`; with
`in_process=True` (tests, debugging) the model runs on a thread of this
process instead.  The manager pauses, resumes, reports on and closes them
all; user-facing text is not its business.
"""
from pyhv.devices.legacy.debug_page import DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE, DebugPage
from pyhv.devices.legacy.i8042 import I8042
from pyhv.devices.legacy.rtc import CmosRtc
from pyhv.devices.legacy.serial import Serial8250
from pyhv.devices.pci.root import PciRoot
from pyhv.proto.errors import HvError, UserError, VmFailure
from pyhv.proto.messages import to_plain
from pyhv.vcpu_worker import platform
from pyhv.vcpu_worker._kvm import lib
from pyhv.vcpu_worker.platform import (COM1_IRQ, COM1_PORT, EXIT_PORT, I8042_COMMAND, I8042_DATA, KEYBOARD_IRQ,
                                       POST_PORT, RTC_PORT)


class DeviceManager:
    def __init__(self, config, mem, router, pio, mmio, console_out, on_reset, on_exit, host=None, launcher=None,
                 in_process=False):
        """`on_reset()` and `on_exit(status)` end the VM (i8042 reset, debug page); `host` resolves device paths."""
        self.config = config
        self.mem = mem
        self.serial = Serial8250(irq=lambda level: router.set_irq_line(COM1_IRQ, level), out=console_out)
        pio.register(COM1_PORT, 8, self.serial, "serial")
        self.i8042 = I8042(reset=on_reset, irq=lambda level: router.set_irq_line(KEYBOARD_IRQ, level))
        pio.register(I8042_DATA, 1, self.i8042.data_port(), "i8042-data")
        pio.register(I8042_COMMAND, 1, self.i8042.command_port(), "i8042-command")
        self.rtc = CmosRtc()
        pio.register(RTC_PORT, 2, self.rtc, "rtc")
        pio.register_fast(POST_PORT, lib.HV_PORT_SINK, "post")
        pio.register_fast(EXIT_PORT, lib.HV_PORT_EXIT, "exit-port")
        self.debug_page = DebugPage(exit_vm=on_exit, console_out=console_out)
        mmio.register(DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE, self.debug_page, "debug-page")
        self.router = router
        self.pci = PciRoot(router)
        self.virtio = {}                     # name -> VirtioPciDevice
        self.plugins = {}                    # name -> PluginDevice
        self._eventfds = []
        try:
            if config.devices:
                self._add_virtio(config, mem, router, host, launcher, in_process)
        except (HvError, OSError) as e:
            self.close()                      # services already started end here
            raise VmFailure(f"cannot add PCI devices: {e}") from None
        self.pci.attach(pio, mmio)
        if config.plugins:
            try:
                self._add_plugins(config, mem, router, pio, mmio, launcher)
            except UserError:
                self.close()
                raise
            except (HvError, OSError) as e:
                self.close()
                raise VmFailure(f"cannot start the device plugins: {e}") from None

    def _add_plugins(self, config, mem, router, pio, mmio, launcher):
        from pyhv.devices.plugin.proxy import PluginDevice, PluginRange
        from pyhv.proto import plugin as wire
        platform.check_plugins(config)        # a config that did not come through supervisor/config.py
        for i, spec in enumerate(config.plugins):
            name = wire.device_name(i)
            self.plugins[name] = PluginDevice.start(name, spec, i, launcher, mem.fd, config.vcpus)
        for name, plugin in self.plugins.items():
            for space, bus, ranges in ((wire.PIO, pio, plugin.spec.pio), (wire.MMIO, mmio, plugin.spec.mmio)):
                for j, r in enumerate(ranges):
                    bus.register(r.base, r.length, PluginRange(plugin, space, j, r.length), name)
            if plugin.spec.irq is not None:
                router.bind_irqfd(plugin.irq_fd, plugin.spec.irq)

    def _add_virtio(self, config, mem, router, host, launcher, in_process):
        # Imported here: a guest without virtio devices (most `hvctl run`s) pays for none of it, ZeroMQ included.
        from pyhv.devices.virtio import kinds
        from pyhv.devices.virtio.device import Eventfds
        from pyhv.devices.virtio.proxy import ServiceProxy
        from pyhv.devices.virtio.transport.pci import VirtioPciDevice
        for name, kind, spec in kinds.named(config.devices):
            if in_process or kind.in_worker:       # vhost-user front ends always run here
                backend = kind.build(kind.service_options(spec.options, host))
                eventfds = Eventfds.create(backend.num_queues)
            else:
                eventfds = Eventfds.create(kind.num_queues(spec.options))
                backend = ServiceProxy(kind, name, mem, eventfds, launcher)
            self._eventfds.append(eventfds)
            try:
                fn = VirtioPciDevice(backend, mem, router, eventfds)
            except BaseException:
                backend.close()
                raise
            self.pci.add(fn, name)
            self.virtio[name] = fn

    def feed_console(self, data):
        self.serial.feed(data)

    def pause(self):
        """Stop every virtio device's data path (requests in hand are finished)."""
        for fn in self.virtio.values():
            fn.pause()

    def resume(self):
        for fn in self.virtio.values():
            fn.resume()

    LEGACY = ("serial", "i8042", "rtc", "debug_page")

    def snapshot(self):
        """Every device's state as plain values (virtio models paused: their services answer for themselves)."""
        state = {name: getattr(self, name).snapshot() for name in self.LEGACY}
        state["pci"] = to_plain(self.pci.snapshot())
        if self.plugins:                  # only then: snapshots of guests without plugins stay as they were
            state["plugins"] = {name: p.snapshot() for name, p in self.plugins.items()}
        return state

    def restore(self, state, paused=False):
        """Continue every device from `snapshot()`'s values: legacy registers, PCI functions, virtio models."""
        from pyhv.proto import codec
        from pyhv.proto.device_service import DeviceState
        from pyhv.proto.errors import ProtocolError, StateError
        try:
            for name in self.LEGACY:
                getattr(self, name).restore(state[name])
            self.pci.restore(state["pci"])
            for name, fn in self.virtio.items():
                saved = state["pci"]["functions"][name].get("device")
                if saved is not None:
                    fn.backend.restore(self.mem, codec.from_plain(DeviceState, saved), paused)
            saved_plugins = state.get("plugins", {})
            if set(saved_plugins) != set(self.plugins):
                raise StateError(f"the snapshot holds the state of plugins {sorted(saved_plugins)}, the guest has "
                                 f"{sorted(self.plugins)}")
            for name, p in self.plugins.items():
                p.restore(saved_plugins[name])
        except ProtocolError as e:
            raise StateError(f"the snapshot's device state is malformed: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise StateError(f"the snapshot's device state is malformed: {type(e).__name__}: {e}") from None
        self.serial.refresh_irq()        # a level the restored irqchip may not hold as a line of ours

    def status(self):
        """Each virtio device's and plugin's health (state, pid, restarts, reason, paused): no call to a process."""
        devices = {**{name: fn.backend for name, fn in self.virtio.items()}, **self.plugins}
        return {name: to_plain(d.status()) for name, d in devices.items()}

    def counters(self):
        return {"serial": self.serial.counters(), "i8042": self.i8042.counters(),
                "debug_page": self.debug_page.counters(), "rtc": self.rtc.counters(),
                "pci": {**self.pci.counters(), **self.router.counters()},
                **{name: p.counters() for name, p in self.plugins.items()}}

    def close(self):
        for p in self.plugins.values():
            p.close()
        self.plugins = {}
        self.pci.close()                      # models stop, services end
        for e in self._eventfds:
            e.close()
        self._eventfds = []
