"""Fuzz: the virtio models' request parsing (devices/virtio/blk.py, net.py, console.py, rng.py) on hostile chains.

Each example posts a batch of chains a hostile driver could make: blk
requests with any type, sector and header split, data and status buffers of
any length (zero-length ones included), descriptors pointing anywhere; net
frames of every size on both queues; and then runs the model's `process`
(what its queue thread runs on a kick) directly, so any exception a model
lets escape fails the test instead of being turned into DEVICE_NEEDS_RESET.
The property: only QueueFatal escapes; the model writes guest RAM only
inside the writable buffers it was given and the used ring (canary RAM);
the counters add up; a read-only image never changes and a writable one
never beyond its last whole sector; the NIC sends and delivers only whole
Ethernet frames.
"""
import os
import struct

import pytest
from hypothesis import event, example, given, strategies as st

from fuzzing import ChainDriver, CanaryMemory, budget
from ringdriver import FakePort
from pyhv.devices.virtio.blk import SECTOR, VirtioBlk
from pyhv.devices.virtio.console import VirtioConsole
from pyhv.devices.virtio.net import ETH_HLEN, HDR_LEN, MAX_FRAME, VirtioNet
from pyhv.devices.virtio.queue import QueueFatal, VirtQueue
from pyhv.devices.virtio.rng import VirtioRng

pytestmark = pytest.mark.fuzz

RAM = 2 << 20
QSIZE = 64
RINGS = (0x1000, 0x2000, 0x3000)
ARENA = 0x10000
SECTORS = 16
IMAGE_BYTES = SECTORS * SECTOR + 100        # a trailing partial sector the guest must never reach

RAW = st.tuples(st.just("raw"), st.one_of(st.integers(0, RAM), st.integers(0, 2 ** 64 - 1)),
                st.one_of(st.integers(0, 4096), st.integers(0, 2 ** 32 - 1)), st.integers(0, 7))
LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 511, 512, 513, 1024, 4096]), st.integers(0, 9000))


@st.composite
def good_blk_request(draw):
    """A request a correct driver makes (the data split over buffers at any byte): it must be served."""
    rtype = draw(st.sampled_from([0, 1, 4, 8]))
    sectors = draw(st.integers(0, 4))
    sector = draw(st.integers(0, SECTORS - sectors))
    header = struct.pack("<IIQ", rtype, 0, sector)
    data = draw(st.binary(min_size=512 * sectors, max_size=512 * sectors)) if rtype in (0, 1) else b""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    if rtype == 1:
        return [(header, False)] + [(p, False) for p in pieces] + [(1, True)]
    return [(header, False)] + [(len(p), True) for p in pieces] + [(21 if rtype == 8 else 1, True)]


@st.composite
def blk_request(draw):
    if draw(st.booleans()):
        return draw(good_blk_request())
    rtype = draw(st.one_of(st.sampled_from([0, 1, 4, 8]), st.integers(0, 2 ** 32 - 1)))
    sector = draw(st.one_of(st.integers(0, SECTORS + 2), st.sampled_from([2 ** 63, 2 ** 64 - 1, 2 ** 55])))
    header = struct.pack("<IIQ", rtype, draw(st.integers(0, 2 ** 32 - 1)), sector)[:draw(st.sampled_from(
        [16, 16, 16, 15, 8, 0]))]
    cut = draw(st.integers(0, len(header)))
    bufs = [(header[:cut], False)] + ([(header[cut:], False)] if draw(st.booleans()) else [])
    bufs += [(draw(st.binary(min_size=n, max_size=n)), False) for n in draw(st.lists(LENGTHS, max_size=3))]
    bufs += [(n, True) for n in draw(st.lists(LENGTHS, max_size=3))]
    bufs += [(n, True) for n in draw(st.sampled_from([[1], [1], [0, 1], [1, 0], [], [2], [0]]))]
    if draw(st.integers(0, 9)) == 0:                     # a descriptor pointing anywhere, with any flags
        bufs.insert(draw(st.integers(0, len(bufs))), (draw(RAW),))
    return bufs


@pytest.fixture(scope="module")
def ram():
    m = CanaryMemory(RAM)
    yield m
    m.close()


def post_all(ram, chains):
    ram.reset()
    driver = ChainDriver(ram, QSIZE, RINGS, ARENA)
    posted = [c for c in chains if driver.post(c) is not None]
    ram.settle()
    return driver, posted


def run(model, index, ram, driver):
    """The model's process() on a queue over the driver's rings; the used elements it made (None if the driver
    had the device write over the used ring, so they cannot be read back)."""
    vq = VirtQueue(ram, QSIZE, *RINGS)
    try:
        try:
            model.process(index, vq)
        except QueueFatal:
            pass
        used = None if driver.used_ring_exposed() else driver.used_elems(vq.used_idx)
        count = vq.used_idx
    finally:
        vq.close()
    ram.assert_written_only_within(driver.writable + [driver.used_ring()])
    return used, count


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(IMAGE_BYTES))
    return p


@budget(120)
@given(chains=st.lists(blk_request(), min_size=1, max_size=12), read_only=st.booleans())
def test_blk_serves_any_request_within_its_buffers_and_its_disk(ram, image, chains, read_only):
    before = image.read_bytes()
    blk = VirtioBlk(str(image), read_only=read_only)
    try:
        driver, posted = post_all(ram, chains)
        used, count = run(blk, 0, ram, driver)
        assert count <= len(posted) and blk.requests + blk.no_status + blk.chain_errors == count
        for head, length in used or ():
            assert 0 <= head < QSIZE and length <= 9000 * 3 + 2
        c = blk.counters()
        event(f"blk: {'some' if blk.read_bytes + blk.write_bytes else 'no'} data moved, "
              f"{'some' if blk.io_errors else 'no'} IOERR")
        assert c["errors"] == blk.io_errors + blk.unsupported + blk.no_status + blk.chain_errors + blk.fatal_errors
    finally:
        blk.close()
    after = image.read_bytes()
    assert len(after) == IMAGE_BYTES and after[SECTORS * SECTOR:] == before[SECTORS * SECTOR:]
    if read_only:
        assert after == before


@st.composite
def frames(draw):
    n = draw(st.one_of(st.sampled_from([0, 1, 13, 14, 15, 60, 1513, 1514, 1515, 2000]), st.integers(0, 1600)))
    return draw(st.binary(min_size=n, max_size=n))


@budget(120)
@given(tx=st.lists(st.lists(st.one_of(st.tuples(frames(), st.just(False)), st.tuples(LENGTHS, st.just(True)),
                                      st.tuples(RAW)), min_size=1, max_size=4), max_size=8),
       rx=st.lists(st.lists(st.one_of(st.tuples(LENGTHS, st.just(True)), st.tuples(frames(), st.just(False)),
                                      st.tuples(RAW)), min_size=1, max_size=3), max_size=8),
       incoming=st.lists(frames(), max_size=10))
def test_net_moves_only_whole_frames_through_any_chains(ram, tx, rx, incoming):
    net = VirtioNet(b"\x52\x54\x00\x12\x34\x56", port=FakePort(), rx_backlog=8)
    try:
        driver, posted = post_all(ram, tx)
        used, count = run(net, 1, ram, driver)
        assert all(length == 0 for _, length in used or ())
        assert all(ETH_HLEN <= len(f) <= MAX_FRAME for f in net.port.sent)
        assert net.tx_frames == len(net.port.sent) and net.tx_frames + net.tx_errors + net.chain_errors == count
        for f in incoming:
            net.deliver(f)
        assert net.counters()["rx_backlog"] <= 8
        good = [f for f in incoming if ETH_HLEN <= len(f) <= MAX_FRAME][:8]
        driver, posted = post_all(ram, rx)
        tx_chain_errors = net.chain_errors
        used, count = run(net, 0, ram, driver)
        assert net.rx_frames + net.rx_errors + net.chain_errors - tx_chain_errors == count
        assert net.rx_frames <= len(good)
        event(f"net: {'some' if net.port.sent else 'no'} frames sent, {'some' if net.rx_frames else 'no'} delivered")
        if used is not None:
            delivered = [length for _, length in used if length]
            assert len(delivered) == net.rx_frames
            assert all(length - HDR_LEN in {len(f) for f in good} for length in delivered)
    finally:
        net.close()


@budget(80)
@example(tx=[[(b"", False)], [(("raw", 0x200B, 4095, 2),)]], rx=[], host=b"")     # rng writes over the used ring
@given(tx=st.lists(st.lists(st.one_of(st.tuples(LENGTHS.map(bytes), st.just(False)),
                                      st.tuples(LENGTHS, st.just(True)), st.tuples(RAW)), min_size=1, max_size=4),
                   max_size=8),
       rx=st.lists(st.lists(st.one_of(st.tuples(LENGTHS, st.just(True)), st.tuples(RAW)), min_size=1, max_size=3),
                   max_size=8),
       host=st.binary(max_size=3000))
def test_console_and_rng_fill_only_writable_buffers(ram, tx, rx, host):
    out = []
    con = VirtioConsole(sink=out.append, backlog_max=1024)
    try:
        driver, _ = post_all(ram, tx)
        run(con, 1, ram, driver)
        assert sum(map(len, out)) == con.tx_bytes
        con.feed(host)
        driver, _ = post_all(ram, rx)
        used, _ = run(con, 0, ram, driver)
        assert con.rx_bytes <= min(len(host), 1024)
        if used is not None:
            assert sum(length for _, length in used) == con.rx_bytes
    finally:
        con.close()
    rng = VirtioRng(max_request=4096)
    try:
        driver, _ = post_all(ram, rx + tx)
        used, count = run(rng, 0, ram, driver)
        assert rng.requests + rng.empty_requests + rng.chain_errors == count
        assert rng.bytes <= 4096 * rng.requests
        if used is not None:
            assert all(length <= 4096 for _, length in used)
    finally:
        rng.close()
