"""ACPI tables for Linux guests whose kernel has no MP-table parser (Debian's cloud kernel): RSDP, XSDT and MADT only.

The MADT describes what the MP table does (boot/mptable.py): one local APIC
per vCPU, the IOAPIC with ISA IRQs identity-mapped (KVM's default routing
wires GSI n to IOAPIC pin n, PIT included), LINT1 = NMI.  There is
deliberately no FADT and no DSDT: Linux parses the MADT in setup_arch(),
then fails to load an ACPI namespace, disables the interpreter, and finds
PCI devices by probing config space (0xCF8) as without ACPI, so no AML is
needed to describe the PCI host bridge.  Kernels without ACPI ignore all of
this.  The RSDP sits at 0xE0000, inside the BIOS area Linux scans.
"""
import struct

from pyhv.vcpu_worker.boot.mptable import IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS

RSDP_ADDR = 0xE0000
XSDT_ADDR = RSDP_ADDR + 0x40
MADT_ADDR = RSDP_ADDR + 0x80
OEM_ID, OEM_TABLE_ID = b"PYHV  ", b"PYHVACPI"
MADT_PCAT_COMPAT = 1             # there are 8259 PICs too (KVM's in-kernel irqchip)
MADT_LAPIC, MADT_IOAPIC, MADT_LAPIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1


def _checksum(data):
    return (-sum(data)) & 0xFF


def _table(signature, revision, body):
    """An ACPI system description table: the 36-byte header, checksummed, then `body`."""
    length = 36 + len(body)
    t = bytearray(struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                              b"PYHV", 1) + body)
    t[9] = _checksum(t)
    return bytes(t)


def madt(vcpus):
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"the MADT describes 1..{MAX_VCPUS} vCPUs here, not {vcpus}")
    entries = [struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED) for i in range(vcpus)]
    entries.append(struct.pack("<BBBBII", MADT_IOAPIC, 12, vcpus, 0, IOAPIC_ADDR, 0))
    entries.append(struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1))
    return _table(b"APIC", 4, struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries))


def xsdt(tables):
    return _table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in tables))


def rsdp(xsdt_addr):
    r = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, bytes(3)))
    r[8] = _checksum(r[:20])
    r[32] = _checksum(r)
    return bytes(r)


def write(mem, vcpus):
    """Write RSDP, XSDT and MADT; returns the RSDP's address (for boot_params.acpi_rsdp_addr)."""
    m = madt(vcpus)
    if MADT_ADDR + len(m) > 0x100000:
        raise ValueError("MADT does not fit below 1 MiB")
    mem.write(MADT_ADDR, m)
    mem.write(XSDT_ADDR, xsdt([MADT_ADDR]))
    mem.write(RSDP_ADDR, rsdp(XSDT_ADDR))
    return RSDP_ADDR
