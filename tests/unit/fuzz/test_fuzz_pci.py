"""Fuzz: PCI config space (devices/pci/) and the virtio-pci transport's register files (devices/virtio/transport/).

A bus like a guest's: the host bridge, a virtio function whose model runs
in this process (virtio-rng on canary RAM: DRIVER_OK really starts it) and
one with a recording backend, wired to a StrictRouter that fails like KVM
(EEXIST for an ioeventfd where one is, ENOENT for removing a missing one,
EBUSY for binding a bound irqfd).  Every config register at every offset and
width through ports 0xCF8-0xCFF, random accesses to every BAR register
(common config, ISR, device config, notify, MSI-X table and PBA, the gaps),
BARs moved anywhere (onto each other too) and COMMAND toggled, from one
thread and from many at once.  The property: no exception, and afterwards
the bus is consistent: decoded BARs are where the guest put them, inside
the window, with memory decoding on and overlapping nothing; KVM has exactly
the notify ioeventfds of the decoded BARs and exactly the irqfds of the live
MSI-X vectors; the window routes to the decoded BARs only.
"""
import random
import threading

import pytest
from hypothesis import example, given, strategies as st

from fuzzing import SLOTS, WIDTHS, Bus, budget, random_op
from pyhv.devices.pci import config_space as CS
from pyhv.devices.virtio.transport import pci as V

pytestmark = pytest.mark.fuzz



@pytest.fixture(params=[False, True], ids=["len2", "any-length"])
def bus(request):
    b = Bus(any_length=request.param)
    yield b
    b.close()


def test_every_config_register_at_every_offset_and_width(bus):
    """Read, write (random values) and read again every byte offset at every width through 0xCFC-0xCFF, on every
    slot, including accesses that run past byte 0xFF (issue 14 defect 4)."""
    rng = random.Random(14)
    for slot in range(SLOTS):
        for reg in range(256):
            for width in WIDTHS:
                before = bus.cfg_read(slot, reg, width)
                assert 0 <= before < 1 << 8 * width
                bus.cfg_write(slot, reg, rng.getrandbits(32), width)
                bus.cfg_read(slot, reg, width)
                bus.check()
    for slot in range(1, 3):                  # identity is read-only whatever was written
        assert bus.cfg_read(slot, CS.VENDOR_ID, 2) == V.VIRTIO_PCI_VENDOR
    assert bus.cfg_read(SLOTS, 0, 4) == 0xFFFF_FFFF


@budget(250)
@given(seed=st.integers(0, 2 ** 32 - 1), steps=st.integers(1, 150), any_length=st.booleans())
@example(seed=2560, steps=18, any_length=False)      # a BAR taking the place another had just left: EEXIST
def test_random_register_sequences_leave_the_bus_consistent(seed, steps, any_length):
    bus = Bus(any_length)
    try:
        rng = random.Random(seed)
        for _ in range(steps):
            random_op(bus, rng)
        bus.check()
    finally:
        bus.close()


@budget(20)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_many_vcpus_at_once(seed):
    """16 threads, each a vCPU doing random_op (COMMAND toggles and BAR moves included: defects 2 and 3): none
    raises, and the bus is consistent when they are done."""
    bus = Bus()
    errors = []

    def vcpu(k):
        rng = random.Random(seed * 64 + k)
        try:
            for _ in range(150):
                random_op(bus, rng)
        except BaseException as e:           # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=vcpu, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        bus.check()
    finally:
        bus.close()
