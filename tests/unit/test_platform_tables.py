"""The tables that tell Linux about CPUs and interrupts: the MP table and the ACPI RSDP/XSDT/MADT, checked as a kernel reads them."""
import struct

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.vcpu_worker.boot import acpi, layout, mptable


@pytest.fixture
def mem():
    fd = create_memfd(2 << 20)
    m = GuestMemory(fd, 2 << 20)
    yield m
    m.close()


def find_rsdp(mem):
    """As Linux does without EFI: 16-byte steps through 0xE0000..0xFFFFF for 'RSD PTR ' with a good checksum."""
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR " and sum(mem.read(addr, 20)) & 0xFF == 0:
            return addr
    return None


def table(mem, addr):
    sig, length = struct.unpack("<4sI", mem.read(addr, 8))
    data = mem.read(addr, length)
    assert sum(data) & 0xFF == 0, f"{sig} checksum"
    return sig, data


@pytest.mark.parametrize("vcpus", [1, 2, 4, 64])
def test_acpi_madt_lists_every_vcpu_and_the_ioapic(mem, vcpus):
    acpi.write(mem, vcpus)
    rsdp = find_rsdp(mem)
    assert rsdp is not None
    r = mem.read(rsdp, 36)
    assert r[15] == 2 and sum(r) & 0xFF == 0                  # ACPI 2.0+ RSDP, extended checksum
    (xsdt_addr,) = struct.unpack_from("<Q", r, 24)
    sig, xsdt = table(mem, xsdt_addr)
    assert sig == b"XSDT"
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    tables = dict(table(mem, a) for a in entries)
    assert set(tables) == {b"APIC"}                           # no FADT/DSDT: see vcpu_worker/boot/acpi.py
    madt = tables[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and flags & 1
    lapics, ioapics, off = [], [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2
        if kind == 0:
            _, apic_id, enabled = struct.unpack_from("<BBI", madt, off + 2)
            lapics.append((apic_id, enabled & 1))
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BBII", madt, off + 2))
        off += length
    assert off == len(madt)
    assert lapics == [(i, 1) for i in range(vcpus)]
    assert ioapics == [(vcpus, 0, 0xFEC00000, 0)]              # id after the CPUs, GSI base 0


def test_mp_table_routes_isa_irqs_to_the_same_ioapic_pin(mem):
    """KVM's default routing wires GSI n to IOAPIC pin n (the PIT's IRQ 0 too)."""
    mptable.write(mem, 2)
    data = mem.read(layout.MPTABLE_ADDR, 0x400)
    (table_addr,) = struct.unpack_from("<I", data, 4)
    off = table_addr - layout.MPTABLE_ADDR
    length, count = struct.unpack_from("<H", data, off + 4)[0], struct.unpack_from("<H", data, off + 34)[0]
    assert sum(data[off:off + length]) & 0xFF == 0
    pos, routes = off + 44, {}
    for _ in range(count):
        kind = data[pos]
        if kind == 0:
            pos += 20
            continue
        if kind == 3:
            _, _, _, bus, irq, _, pin = struct.unpack_from("<BBHBBBB", data, pos)
            routes[irq] = pin
        pos += 8
    assert routes == {irq: irq for irq in range(16)}
