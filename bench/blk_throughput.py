"""virtio-blk throughput: a raw64 guest reading a 256 MiB image through hvctl, beside the host reading the same file.

The guest (bench/guests/blk_bench.c, ring 0, emulated on the nested hosts)
drives virtio-blk over virtio-pci and never touches the data: it keeps
requests in flight, polls the used ring, refills each slot as it completes,
and times itself with the TSC (RDX at entry = TSC kHz).  One
`hvctl run --boot raw64 --disk IMG --mem 512M` per sample; the device model
runs in its device-service process (ioeventfd in, guest RAM by preadv, the
used ring polled: no interrupt).
  - sequential: the whole image, SEQ_CHUNK (4 MiB) a request, SEQ_DEPTH (4)
    in flight, all into the same SEQ_CHUNK of guest RAM (the guest never
    reads it; distinct buffers made the service's copy ~1.5x slower, cache
    misses); beside it the host's os.preadv of the same file, SEQ_CHUNK at a
    time, into one buffer.  With 1 MiB x 8 the guest reached 0.62x warm /
    0.79x cold: the service's Python per request and the emulated driver's
    refill are fixed costs, spread over 4x the bytes at 4 MiB.  Both cold
    (`sync; echo 3 > /proc/sys/vm/drop_caches` before each, root only) and
    both warm (the file is in the page cache).  "Cold" is this machine's page
    cache only: the file is read once, untimed, before the first sample, so
    the virtual disk underneath (which may cache) is in the same state for
    every cold sample;
  - random: 4 KiB reads at random 4 KiB-aligned offsets, 16 in flight, for
    2 s (warm cache); beside it the host's os.preadv of 4 KiB at random
    offsets, one at a time (warm: the queue depth makes no difference there);
  - the same guest figures with HV_BLK_ZMQ_ROUNDTRIP=ENDPOINT: the service
    makes one ZeroMQ REQ/REP round trip to an echo process this benchmark runs
    there, per request, before doing it (the benchmark mode of
    devices/virtio/service.py): what the eventfd data path saves over a
    per-request message;
  - the same guest with `--vhost-user blk` on qemu-storage-daemon exporting
    the same image (raw, through the page cache) as vhost-user-blk, when it
    is installed: the same transport and eventfds with QEMU's C back end in
    place of pyhv's Python service.  One daemon per sample.
The "vs C" column is the ratio to the host figure of the same kind.  Image
created at benchmark time in a temp dir (TMPDIR), filled with non-zero data.
Cases are interleaved, repetition by repetition.
"""
import os
import pathlib
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

IMAGE_BYTES = 256 << 20
SEQ_CHUNK = 4 << 20
SEQ_DEPTH = 4
SEQ_BUFS = 1            # every sequential slot reads into the same buffer, as the host's preadv does
RAND_BLOCK = 4096
RAND_DEPTH = 16
RAND_MS = 2000
GUEST_MEM = "512M"
REPS = 3
ZMQ_ENV = "HV_BLK_ZMQ_ROUNDTRIP"
GUEST_SRC = common.BENCH / "guests" / "blk_bench.c"


def build_guest(rand_ms):
    defs = (f"-DSEQ_CHUNK={SEQ_CHUNK}", f"-DSEQ_DEPTH={SEQ_DEPTH}", f"-DSEQ_BUFS={SEQ_BUFS}", f"-DRAND_DEPTH={RAND_DEPTH}",
            f"-DRAND_MS={rand_ms}")
    return common.guestbuild.build_c(GUEST_SRC.read_text(), cflags=("-mgeneral-regs-only", *defs))


def make_image(path):
    """IMAGE_BYTES of non-zero data (a random MiB, each copy stamped with its index), written back to disk."""
    chunk = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(IMAGE_BYTES >> 20):
            struct.pack_into("<Q", chunk, 0, i + 1)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())          # dirty pages would survive drop_caches


def drop_caches():
    """Empty the page cache; False if not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def host_seq(path):
    """MB/s (10^6 bytes) of os.preadv of the whole file, SEQ_CHUNK at a time, into one buffer."""
    buf = bytearray(SEQ_CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        off = 0
        while off < IMAGE_BYTES:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                sys.exit(f"bench: short read of {path} at {off}")
            off += n
        return IMAGE_BYTES / (time.perf_counter() - t) / 1e6
    finally:
        os.close(fd)


def host_rand(path, seconds=RAND_MS / 1000):
    """IOPS of os.preadv of RAND_BLOCK bytes at random aligned offsets, one at a time, for `seconds`."""
    buf = bytearray(RAND_BLOCK)
    blocks = IMAGE_BYTES // RAND_BLOCK
    rnd = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(256):
                os.preadv(fd, [buf], rnd.randrange(blocks) * RAND_BLOCK)
            n += 256
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)
    finally:
        os.close(fd)


def guest(args, kernel, image, mode):
    """One hvctl run: {"seq_mbs": .., "rand_iops": .. (if the guest ran that part), "tsc_khz": ..}."""
    env = dict(common.CHILD_ENV)
    env.pop(ZMQ_ENV, None)
    echo = Echo() if mode == "zmq" else None
    qsd = QsdExport(image) if mode == "vhost-user" else None
    if echo is not None:
        env[ZMQ_ENV] = echo.endpoint
    disk = ["--vhost-user", f"blk,socket={qsd.sock}"] if qsd else ["--disk", str(image)]
    cmd = common.hvctl_cmd(args) + ["run", "--boot", "raw64", "--kernel", str(kernel), *disk,
                                    "--mem", GUEST_MEM, "--timeout", "120"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=180)
    finally:
        for helper in (echo, qsd):
            if helper is not None:
                helper.close()
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0 or "done" not in out:
        sys.exit(f"bench: {' '.join(cmd)} exited {r.returncode}; stdout {out[-300:]!r}; "
                 f"stderr: {r.stderr.decode(errors='replace').strip()[-2000:]}")
    res = {"tsc_khz": int(re.search(r"tsc_khz=(\d+)", out).group(1))}
    m = re.search(r"seq bytes=(\d+) us=(\d+)", out)
    if int(m.group(1)) != IMAGE_BYTES:
        sys.exit(f"bench: the guest read {m.group(1)} bytes, not {IMAGE_BYTES}")
    res["seq_mbs"] = int(m.group(1)) / int(m.group(2))          # bytes/us = MB/s
    m = re.search(r"rand ios=(\d+) us=(\d+)", out)
    if m:
        res["rand_iops"] = int(m.group(1)) * 1e6 / int(m.group(2))
    return res


ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.REP)
s.bind(sys.argv[1])
p = zmq.Poller()
p.register(s, zmq.POLLIN)
p.register(0, zmq.POLLIN)
print("ready", flush=True)
while True:
    ready = dict(p.poll())
    if 0 in ready:
        break
    s.send(s.recv())
"""


class Echo:
    """The REP end of the per-request round trip: a process of its own, gone when its stdin closes."""

    def __init__(self):
        self.endpoint = f"ipc://@pyhv-blk-echo-{os.getpid()}"          # abstract: nothing to clean up
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO, self.endpoint], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=common.CHILD_ENV)
        self.proc.stdout.readline()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


class QsdExport:
    """qemu-storage-daemon exporting `image` (raw) as vhost-user-blk on a socket of its own, until close()."""

    def __init__(self, image):
        self.dir = tempfile.mkdtemp(prefix="pyhv-qsd-")
        self.sock = os.path.join(self.dir, "blk.sock")
        self.proc = subprocess.Popen(
            [QSD, "--blockdev", f"driver=file,node-name=disk,filename={image},read-only=on",
             "--export", f"type=vhost-user-blk,id=vub,node-name=disk,addr.type=unix,addr.path={self.sock}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                sys.exit(f"bench: qemu-storage-daemon did not start: {self.proc.stderr.read().decode()[-500:]}")
            time.sleep(0.01)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


QSD = shutil.which("qemu-storage-daemon")


def run(args):
    reps = args.reps or REPS
    full = build_guest(RAND_MS)       # sequential, then random
    seq_only = build_guest(0)         # for the cold runs: the random part would be warm anyway
    modes = [("eventfd", "eventfd"), ("zmq round trip", "zmq")]
    if QSD:
        modes.append(("vhost-user qemu-storage-daemon", "vhost-user"))
    else:
        print("blk_throughput: no qemu-storage-daemon (qemu-system-common): vhost-user rows skipped", file=sys.stderr)
    cold_ok = drop_caches()
    if not cold_ok:
        print("blk_throughput: cannot write /proc/sys/vm/drop_caches (not root): cold rows skipped", file=sys.stderr)
    s = {}

    def add(key, v):
        s.setdefault(key, []).append(v)

    tsc = set()
    with tempfile.TemporaryDirectory(prefix="pyhv-blk-bench-") as tmp:
        image = pathlib.Path(tmp) / "disk.img"
        make_image(image)
        if cold_ok:                   # the virtual disk below may cache too: let every cold sample see
            drop_caches()             # the same state, not only the first one pay for the real disk
            host_seq(image)
        for _ in range(reps):
            if cold_ok:
                drop_caches()
                add("host cold", host_seq(image))
                for name, mode in modes:
                    drop_caches()
                    r = guest(args, seq_only, image, mode)
                    add(f"guest cold {name}", r["seq_mbs"])
                    tsc.add(r["tsc_khz"])
            host_seq(image)                     # make sure the whole file is cached
            add("host warm", host_seq(image))
            add("host rand", host_rand(image))
            for name, mode in modes:
                r = guest(args, full, image, mode)
                add(f"guest warm {name}", r["seq_mbs"])
                add(f"guest rand {name}", r["rand_iops"])
                tsc.add(r["tsc_khz"])

    B = "blk_throughput"
    extra = {"image_bytes": IMAGE_BYTES, "guest_tsc_khz": sorted(tsc)}
    seq = f"{SEQ_CHUNK >> 20} MiB x{SEQ_DEPTH}"
    rows = []
    for cache in (["cold", "warm"] if cold_ok else ["warm"]):
        ref = common.row(B, f"seq read, host preadv {SEQ_CHUNK >> 20} MiB, {cache} cache", s[f"host {cache}"], "MB/s", **extra)
        rows.append(ref)
        for name, _ in modes:
            rows.append(common.row(B, f"seq read, guest {seq}, {name}, {cache} cache",
                                   s[f"guest {cache} {name}"], "MB/s", ref=ref, **extra))
    ref = common.row(B, "4K random read, host preadv QD1, warm", s["host rand"], "IOPS", **extra)
    rows.append(ref)
    for name, _ in modes:
        rows.append(common.row(B, f"4K random read, guest QD{RAND_DEPTH}, {name}, warm",
                               s[f"guest rand {name}"], "IOPS", ref=ref, **extra))
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
