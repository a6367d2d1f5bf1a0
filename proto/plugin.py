"""The device-plugin contract on the wire: a worker's accesses to a plugin process, the plugin's hello, its start.

A port/MMIO plugin (`--device MODULE:CLASS`, docs/plugins.md) runs in a
process of its own, `devices/plugin/host.py`.  The worker talks to it over
unix SEQPACKET socket pairs, one per vCPU, so a vCPU waiting for the plugin
holds nothing another vCPU needs.  Each guest access is one datagram each
way, packed by hand: this is the data path, where msgpack and ZeroMQ would
cost more than the access itself.
* Request: REQUEST (op, space, range index, size, offset), then a write's
  bytes, or RESTORE's state (msgpack).
* Reply: one status byte; OK then a read's bytes (SNAPSHOT: the state,
  msgpack), FAILED then the reason (UTF-8).  After a FAILED reply to an
  access the plugin process exits: a plugin that raised is done.
  REFUSED then the reason: a snapshot()/restore() the plugin lacks or that
  raised; it keeps serving.
* The first datagram the plugin sends, on socket 0 before any request, is OK
  then a PluginHello (msgpack, channel PLUGIN), or FAILED then why it could
  not start.
Spawning: the worker names the plugin by index in a SpawnPlugin on the
supervisor's spawn socket (channel SPAWN, as SpawnService); the supervisor
builds the PluginProcess from its own copy of the guest's config.
"""
import struct

from pyhv.proto.device_service import SPAWN
from pyhv.proto.guest import PluginRange, PluginSpec
from pyhv.proto.messages import Channel, Message, message

PLUGIN = Channel("plugin")               # PluginHello, on the first datagram
PLUGIN_SPEC = Channel("plugin-spec")     # PluginProcess, a plugin process's --spec

REQUEST = struct.Struct("<BBHHQ")        # op, space, range index, size, offset
READ, WRITE, SNAPSHOT, RESTORE = 0, 1, 2, 3
PIO, MMIO = 0, 1
OK, FAILED, REFUSED = b"\x00", b"\x01", b"\x02"
MAX_ACCESS = 8                           # bytes: the widest port or MMIO access KVM reports
MAX_REPLY = 4096
MAX_STATE = 64 << 10                     # bytes of a plugin's snapshot state, msgpack (one datagram)
MAX_REASON = 400                         # bytes of a failure's text


@PLUGIN
class PluginHello(Message):
    """What a plugin instance declared, as its process checked it: its ranges and the interrupt line it raises."""
    name: str                            # its class, for messages
    pio: list[PluginRange] = list
    mmio: list[PluginRange] = list
    irq: int | None = None


@message
class PluginFds(Message):
    """The fds a plugin process is given, by role: numbers in the receiving process (or SCM_RIGHTS positions)."""
    mem: int                             # guest RAM memfd
    irq: int                             # an eventfd: a write pulses the plugin's irq line (bound once declared)
    sockets: list[int]                   # one SEQPACKET socket per vCPU

    def all(self):
        return [self.mem, self.irq, *self.sockets]

    def renumbered(self, fds):
        return PluginFds(fds[self.mem], fds[self.irq], [fds[i] for i in self.sockets])

    @classmethod
    def positions(cls, sockets):
        return cls(0, 1, list(range(2, 2 + sockets)))


@PLUGIN_SPEC
class PluginProcess(Message):
    """What a plugin process runs: the guest's PluginSpec, its device name, guest RAM's size, its fds."""
    plugin: PluginSpec
    name: str                            # e.g. plugin0
    mem_size: int
    fds: PluginFds


@SPAWN
class SpawnPlugin(Message):
    """Worker -> supervisor (fds in SCM_RIGHTS): start the process of plugin `index` of this guest."""
    guest: str
    index: int
    fds: PluginFds                       # positions in the SCM_RIGHTS array


def device_name(index):
    """A plugin's name in `hvctl info` and its pids (`device:plugin0`)."""
    return f"plugin{index}"
