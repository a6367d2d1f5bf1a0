"""A virtio-rng whose bytes come from a seeded generator: entropy an experiment can replay exactly.

An example virtio device plugin (docs/plugins.md): a VirtioDevice model, like
the built-in ones, served in a device process of its own behind a virtio-pci
function.  Linux's virtio-rng driver takes it as /dev/hwrng.

    hvctl run ... --device examples/plugins/seeded_rng.py:SeededRng,seed=42

The stream is the concatenation of random.Random(seed).randbytes(4096)
blocks, handed out in request order; its position is part of the device's
snapshot, so a restored guest continues the same stream.
"""
import random

from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_RNG
from pyhv.devices.virtio.threaded import ThreadedBackend

MAX_REQUEST = 4096
BLOCK = 4096


def stream(seed, n):
    """The first `n` bytes of seed's stream."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(BLOCK) for _ in range(-(-n // BLOCK)))[:n]


class SeededRng(ThreadedBackend):
    device_type = VIRTIO_ID_RNG
    features = VIRTIO_F_VERSION_1
    num_queues = 1
    queue_max_sizes = (64,)
    name = "virtio-seeded-rng"

    def __init__(self, seed="0"):
        super().__init__()
        self.seed = int(seed, 0)
        self.requests = 0
        self._seek(0)

    def _seek(self, position):
        """Put the stream at byte `position` (a fresh generator, advanced block by block)."""
        self.produced = position
        self._rng = random.Random(self.seed)
        for _ in range(position // BLOCK):
            self._rng.randbytes(BLOCK)
        self._block = self._rng.randbytes(BLOCK)[position % BLOCK:] if position % BLOCK else b""

    def _take(self, n):
        out = bytearray()
        while len(out) < n:
            if not self._block:
                self._block = self._rng.randbytes(BLOCK)
            k = min(n - len(out), len(self._block))
            out += self._block[:k]
            self._block = self._block[k:]
        self.produced += n
        return bytes(out)

    def process(self, index, vq):
        while (chain := self.pop(vq)) is not None:
            n = min(chain.writable_len, MAX_REQUEST)
            vq.put(chain.head, chain.write_into(self._take(n)) if n else 0)
            self.requests += 1

    def model_state(self):
        return {"seed": self.seed, "produced": self.produced}

    def restore_model_state(self, state):
        self.seed = state["seed"]
        self._seek(state["produced"])

    def counters(self):
        return {**super().counters(), "requests": self.requests, "bytes": self.produced}
