"""The machine every guest gets at fixed places: its ports, MMIO pages and interrupt lines, and who may use the rest.

The device manager wires the devices at these places; device plugins
(docs/plugins.md) may take any port, address or line not listed here, not
in guest RAM and not another plugin's, which `check_plugins` decides from a
config alone (no plugin runs for it).  The ports and pages of KVM's in-kernel
PIC, PIT, IOAPIC and LAPIC never leave the kernel, so a plugin there would
never be called: they are listed as taken too.
"""
from pyhv.devices.legacy.debug_page import DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE
from pyhv.devices.pci.root import CONFIG_ADDRESS_PORT, MMIO_WINDOW_END, MMIO_WINDOW_START
from pyhv.proto.errors import UserError
from pyhv.proto.guest import ram_ranges
from pyhv.vcpu_worker.boot import layout
from pyhv.vcpu_worker.boot.mptable import IOAPIC_ADDR, LAPIC_ADDR

COM1_PORT, COM1_IRQ = 0x3F8, 4
KEYBOARD_IRQ = 1
I8042_DATA, I8042_COMMAND = 0x60, 0x64
RTC_PORT = 0x70
EXIT_PORT, POST_PORT = 0x501, 0x80

PORTS = [   # (base, length, owner)
    (COM1_PORT, 8, "the serial port COM1"), (I8042_DATA, 1, "the i8042"), (I8042_COMMAND, 1, "the i8042"),
    (RTC_PORT, 2, "the RTC"), (POST_PORT, 1, "the POST port"), (EXIT_PORT, 1, "the exit port"),
    (CONFIG_ADDRESS_PORT, 8, "PCI configuration"), (0x20, 2, "the PIC (in KVM)"), (0xA0, 2, "the PIC (in KVM)"),
    (0x4D0, 2, "the PIC's ELCR (in KVM)"), (0x40, 4, "the PIT (in KVM)"), (0x61, 1, "the PIT's speaker port (in KVM)"),
]
MMIO = [
    (DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE, "the debug page"),
    (MMIO_WINDOW_START, MMIO_WINDOW_END - MMIO_WINDOW_START, "the PCI MMIO window"),
    (IOAPIC_ADDR, 0x1000, "the IOAPIC (in KVM)"), (LAPIC_ADDR, 0x1000, "the LAPIC (in KVM)"),
    (layout.KVM_IDENTITY_MAP_ADDR, 0x4000, "KVM's identity map and TSS"),
]
IRQS = {0: "the PIT", 1: "the i8042", 2: "the PIC cascade", 4: "COM1", 8: "the RTC"}


def check_plugins(config):
    """UserError unless the ranges and lines `config`'s plugins declared are free (of the platform, RAM, each other)."""
    taken = {"pio": list(PORTS), "mmio": MMIO + [(b, n, "guest RAM") for b, n in ram_ranges(config.mem_bytes)]}
    irqs = dict(IRQS)
    for spec in config.plugins:
        for space in ("pio", "mmio"):
            for r in getattr(spec, space):
                for base, length, owner in taken[space]:
                    if r.base < base + length and base < r.base + r.length:
                        unit = "ports" if space == "pio" else "MMIO"
                        raise UserError(f"{spec.what}: {unit} 0x{r.base:x}+0x{r.length:x} overlap {owner} "
                                        f"(0x{base:x}+0x{length:x}); choose another base")
                taken[space].append((r.base, r.length, f"{spec.cls} ({spec.what})"))
        if spec.irq is not None:
            if spec.irq in irqs:
                raise UserError(f"{spec.what}: irq {spec.irq} is taken by {irqs[spec.irq]}")
            irqs[spec.irq] = f"{spec.cls} ({spec.what})"
