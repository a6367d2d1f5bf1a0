"""virtio-rng (entropy device, type 4): fills the driver's device-writable buffers with os.urandom.

One request queue, no device-specific config, no device features beyond
VIRTIO_F_VERSION_1.  A request is any descriptor chain; the device writes
random bytes into its device-writable buffers only (never into a readable
one, never past a buffer's end) and returns it with the number of bytes
written.  A single request is served up to MAX_REQUEST bytes (the spec lets
the device fill less than offered).  A chain with no writable buffer, or a
malformed one (ChainError from the queue), is returned with length 0 and
counted in `errors`; the queue keeps serving.
"""
import os

from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_RNG
from pyhv.devices.virtio.threaded import ThreadedBackend

MAX_REQUEST = 64 << 10
QUEUE_SIZE = 256


class VirtioRng(ThreadedBackend):
    device_type = VIRTIO_ID_RNG
    features = VIRTIO_F_VERSION_1
    num_queues = 1
    queue_max_sizes = (QUEUE_SIZE,)
    name = "virtio-rng"

    def __init__(self, max_request=MAX_REQUEST):
        super().__init__()
        self.max_request = max_request
        self.requests = 0
        self.bytes = 0
        self.empty_requests = 0      # chains with no device-writable buffer

    def process(self, index, vq):
        while True:
            chain = self.pop(vq)
            if chain is None:
                return
            n = min(chain.writable_len, self.max_request)
            if n == 0:
                self.empty_requests += 1
                vq.put(chain.head, 0)
                continue
            written = chain.write_into(os.urandom(n))
            vq.put(chain.head, written)
            self.requests += 1
            self.bytes += written

    @property
    def errors(self):
        return self.chain_errors + self.empty_requests + self.fatal_errors

    def counters(self):
        c = super().counters()
        c.update(requests=self.requests, bytes=self.bytes, errors=self.errors,
                 empty_requests=self.empty_requests)
        return c
