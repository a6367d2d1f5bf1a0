"""The CPUID a vCPU sees: KVM's supported set, per-vCPU topology, and the compatibility profile's masks."""
from pyhv.vcpu_worker._kvm import ffi


def _clear(entries, leaf, subleaf, reg, bit):
    for e in entries:
        if e.function == leaf and (subleaf is None or e.index == subleaf):
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))


def vcpu_cpuid(supported, index, count, masks=()):
    """A fresh copy of `supported` adjusted for vCPU `index` of `count` (a cdata array that owns its entries).

    One owning array, not a list of `ffi.new(...)[0]`: an element taken from
    a temporary owner points into freed memory once the owner is collected,
    and masks written there were silently lost (or kept) depending on
    allocation patterns.
    """
    entries = ffi.new("struct kvm_cpuid_entry2[]", len(supported))
    for i, src in enumerate(supported):
        entries[i] = src
    for e in entries:
        if e.function == 1:
            # Initial APIC ID, logical processor count, HTT when SMP.
            e.ebx = (e.ebx & 0x0000FFFF) | (index & 0xFF) << 24 | (min(count, 255) & 0xFF) << 16
            e.edx = e.edx | (1 << 28) if count > 1 else e.edx & ~(1 << 28)
        elif e.function in (0xB, 0x1F):
            e.edx = index               # x2APIC ID
    for leaf, subleaf, reg, bit, _why in masks:
        _clear(entries, leaf, subleaf, reg, bit)
    return entries
