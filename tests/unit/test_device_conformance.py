"""One conformance run against every device kind (devices/virtio/kinds.py), in this process and in its service.

Each kind's model must describe itself consistently, serve an activated
queue, pause (touching no guest memory), snapshot while paused (and refuse
while running), restore into a fresh instance that continues from the same
queue positions, reset and close.  A device lacking a lifecycle method fails
loudly (Unsupported), never silently.  vhost-user kinds, whose state is in
their back end's process and which cannot snapshot, have their own tests
(test_vhost_user.py).
"""
import os
import struct

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.device import (VIRTIO_F_VERSION_1, Eventfds, TransportEvents, Unsupported,
                                        VirtioDevice)
from pyhv.devices.virtio.proxy import ServiceProxy
from pyhv.proto import runtime
from pyhv.proto.device_service import DeviceHealth, DeviceState, QueueConfig
from pyhv.proto.errors import HvError, UserError
from pyhv.proto.guest import DeviceSpec, GuestConfig, PluginSpec
from pyhv.vcpu_worker.launchers import LocalLauncher
from hv import REPO
from ringdriver import RingDriver

RAM = 16 << 20
QSIZE = 8
RINGS = 0x10000          # queue i's rings at RINGS + i * 0x4000 (desc, avail, used 0x1000 apart)


def rings(i):
    base = RINGS + i * 0x4000
    return base, base + 0x1000, base + 0x2000


@pytest.fixture
def host(tmp_path):
    h = runtime.PrivateDir()
    h.switch_root = str(tmp_path)              # no switch runs there: the net port only connects
    yield h
    h.remove()


def options_for(kind, tmp_path):
    if kind == "blk":
        img = tmp_path / "d.img"
        img.write_bytes(bytes(range(256)) * 64)
        return {"path": str(img)}
    if kind == "net":
        return {"port": "switch:conformance", "mac": "52:54:00:12:34:56"}
    if kind == "plugin":        # the example virtio plugin, as `--device` makes it
        example = PluginSpec(str(REPO / "examples" / "plugins" / "seeded_rng.py"), "SeededRng", {"seed": "7"})
        return kinds.Plugin.spec(example, 1).options
    return {}


BUF = 0x100000


def post_request(kind_name, mem, drv):
    """One request on queue 0 that the kind serves without host input (None for receive-first kinds)."""
    if kind_name in ("rng", "plugin"):
        return drv.post([(BUF, 64, True)])
    if kind_name == "blk":
        mem.write(BUF, struct.pack("<IIQ", 0, 0, 1))
        return drv.post([(BUF, 16, False), (BUF + 0x1000, 512, True), (BUF + 0x2000, 1, True)])
    return None


class Guest:
    def __init__(self):
        self.fd = create_memfd(RAM)
        self.mem = GuestMemory(self.fd, RAM)

    def close(self):
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    launcher = _launchers.pop(g, None)
    if launcher is not None:
        launcher.close()
    g.close()


_launchers = {}


def build(kind_name, where, guest, host, tmp_path):
    """(device, eventfds) for a kind, its model here or behind a ServiceProxy (one launcher per guest, holding its
    disk image, as `hvctl run` has: a second instance is the same guest's next incarnation)."""
    kind = kinds.kind(kind_name)
    options = options_for(kind_name, tmp_path)
    eventfds = Eventfds.create(kind.num_queues(options))
    if where == "here":
        dev = kind.build_checked(kind.service_options(options, host))
    else:
        config = GuestConfig(name="c", kernel="/k", mem_bytes=RAM, devices=[DeviceSpec(kind_name, options)])
        if guest not in _launchers:
            _launchers[guest] = LocalLauncher(config, host)
        dev = ServiceProxy(kind, kinds.named(config.devices)[0][0], guest.mem, eventfds, _launchers[guest])
    dev.attach(TransportEvents(), eventfds)
    return dev, eventfds


@pytest.mark.parametrize("where", ["here", "service"])
@pytest.mark.parametrize("kind_name", sorted(k for k in kinds.KINDS if kinds.KINDS[k].snapshottable))
def test_every_kind_follows_the_device_lifecycle(kind_name, where, guest, host, tmp_path):
    dev, eventfds = build(kind_name, where, guest, host, tmp_path)
    other = None
    try:
        # the static description
        assert dev.features & VIRTIO_F_VERSION_1
        assert dev.num_queues == len(dev.queue_max_sizes) >= 1 and 0 < dev.device_type < 64
        assert isinstance(dev.config_bytes(), bytes) and dev.name.startswith("virtio-")
        assert isinstance(dev.status(), DeviceHealth) and dev.status().state == "running"
        # activate every queue and post one chain on queue 0 (device-writable, so every kind may use it)
        queues = [QueueConfig(i, QSIZE, *rings(i), i) for i in range(dev.num_queues)]
        drv = RingDriver(guest.mem, QSIZE, rings(0))
        features = VIRTIO_F_VERSION_1
        dev.activate(guest.mem, features, queues)
        assert isinstance(dev.counters(), dict)
        served = 0
        if post_request(kind_name, guest.mem, drv) is not None:
            os.eventfd_write(eventfds.notify_fd(0), 1)
            drv.wait_used()
            served = 1
        # a snapshot is for a paused device; paused, it holds the queues where they are
        with pytest.raises(HvError, match="pause it first"):
            dev.snapshot()
        dev.pause()
        state = dev.snapshot()
        assert isinstance(state, DeviceState) and state.features == features
        assert [q.config for q in state.queues] == queues
        assert (state.queues[0].last_avail_idx, state.queues[0].used_idx) == (served, served)
        assert all(q.used_idx == q.last_avail_idx == 0 for q in state.queues[1:])
        dev.resume()
        # a fresh instance restored from the state continues from those positions
        dev.reset()
        other, other_fds = build(kind_name, where, guest, host, tmp_path)
        other.restore(guest.mem, state, paused=True)
        again = other.snapshot()
        assert [(q.config, q.last_avail_idx, q.used_idx) for q in again.queues] == \
            [(q.config, q.last_avail_idx, q.used_idx) for q in state.queues]
        other.resume()
        if post_request(kind_name, guest.mem, drv) is not None:    # the restored one serves the next request
            os.eventfd_write(other_fds.notify_fd(0), 1)
            drv.wait_used()
            assert other.counters()["requests"] >= 1
        other.reset()
        other.close()
        other_fds.close()
        other = None
        assert drv.pending_used() == 0
    finally:
        if other is not None:
            other.close()
        dev.close()
        eventfds.close()


def test_a_device_without_lifecycle_methods_fails_loudly():
    class Bare(VirtioDevice):
        name = "virtio-bare"
    d = Bare()
    for call, what in ((lambda: d.activate(None, 0, []), "be activated"), (d.reset, "reset"), (d.pause, "pause"),
                       (d.resume, "resume"), (d.snapshot, "snapshot"), (lambda: d.restore(None, None), "restore")):
        with pytest.raises(Unsupported, match=f"virtio-bare cannot {what}"):
            call()


def test_every_kind_names_its_devices_and_checks_its_options(tmp_path):
    seen = set()
    for name, k in kinds.KINDS.items():
        assert k.name == name and k.flag.startswith("--") and k.help
        names = [k.device_name(i) for i in range(k.max_count)]
        assert len(set(names)) == k.max_count and not seen & set(names)
        seen |= set(names)
        with pytest.raises(UserError, match="unknown option"):
            k.validate({"no-such-option": "x"})
