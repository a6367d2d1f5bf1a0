"""The Intel MultiProcessor Specification 1.4 table: how Linux finds our vCPUs and the IOAPIC without ACPI.

Layout follows the spec (and Firecracker's mptable.rs): a floating pointer
structure, then the configuration table with one processor entry per vCPU,
an ISA bus, the IOAPIC, ISA IRQ routing (identity: KVM's default routing
wires GSI n to IOAPIC pin n, the PIT's GSI 0 included; saying pin 2 made
Linux report "MP-BIOS bug: 8254 timer not connected" and spend ~1 s probing)
and the LINT0/LINT1 local interrupts.  Linux scans the top of base
memory (0x9FC00) for the "_MP_" signature.
"""
import struct

from pyhv.vcpu_worker.boot import layout

IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
APIC_VERSION = 0x14
CPU_FEATURES = 0x0000_0201   # FPU | APIC, as reported in CPUID.1:EDX
CPU_SIGNATURE = 0x600        # family 6

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINT, ENTRY_LINTSRC = 0, 1, 2, 3, 4
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
ISA_BUS_ID = 0
MAX_VCPUS = 254              # xAPIC IDs are 8 bits and the IOAPIC takes one


def _checksum(data):
    return (-sum(data)) & 0xFF


def build(vcpus, addr=layout.MPTABLE_ADDR):
    """The floating pointer plus configuration table, to be written at `addr`."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"an MP table describes 1..{MAX_VCPUS} vCPUs, not {vcpus}")
    ioapic_id = vcpus
    entries = []
    for i in range(vcpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0)
        entries.append(struct.pack("<BBBBIIII", ENTRY_PROCESSOR, i, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES, 0, 0))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(16):
        entries.append(struct.pack("<BBHBBBB", ENTRY_IOINT, INT_TYPE_INT, 0, ISA_BUS_ID, irq, ioapic_id, irq))
    # LINT0 = ExtINT (the PIC through virtual wire), LINT1 = NMI, on every LAPIC (0xFF).
    entries.append(struct.pack("<BBHBBBB", ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LINTSRC, INT_TYPE_NMI, 0, ISA_BUS_ID, 0, 0xFF, 1))
    body = b"".join(entries)

    table_addr = addr + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0, b"PYHV    ",
                                   b"PYHV MPTABLE", 0, 0, len(entries), LAPIC_ADDR, 0, 0, 0))
    table = header + body
    table[7] = _checksum(table)

    floating = bytearray(struct.pack("<4sIBBBB4s", b"_MP_", table_addr, 1, 4, 0, 0, bytes(4)))
    floating[10] = _checksum(floating)
    return bytes(floating) + bytes(table)


def write(mem, vcpus, addr=layout.MPTABLE_ADDR):
    data = build(vcpus, addr)
    # Large tables run past 0xA0000: still guest RAM here, and e820 reserves
    # everything from the EBDA to 1 MiB.
    if addr + len(data) > layout.HIMEM_START:
        raise ValueError(f"MP table for {vcpus} vCPUs does not fit below 1 MiB")
    mem.write(addr, data)
    return len(data)
