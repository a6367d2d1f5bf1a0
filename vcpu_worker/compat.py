"""Compatibility profiles: what a guest needs to run on a given kind of KVM host, in one place.

`nested` (the default) is for hosts like ours, where KVM runs nested
(kvm_pvm) and guest kernel code goes through KVM's instruction emulator:
CPUID bits the emulator can't back are cleared where KVM honours that,
Linux gets kernel arguments that steer it away from the rest, and
instructions that still fail are fixed up by the VMM (vcpu_worker.fixups),
and where the host's SYSCALL stays in ring 3 (probed once per host boot)
the VMM finishes guest system calls itself (vcpu_worker.syscall_hook).
`none` passes the host's CPUID through and adds nothing.  The facts behind
each entry are in docs/kvm-notes.md and ../shared/docs/kvm-on-these-machines.md.
"""

# (leaf, subleaf or None, register, bit, why)
NESTED_CPUID_MASKS = (
    (1, None, "ecx", 13, "CX16: lock cmpxchg16b cannot be emulated"),
)
# Measured (tests/kvm/test_emulator_fixups.py): KVM here honours a cleared CX16 but not cleared
# SSSE3/SSE4.1/SSE4.2/AES/PCLMULQDQ bits (nor XSAVE or leaf 7): those need clearcpuid= below.

# Kernel arguments added to Linux command lines (unless the user set the same key).
NESTED_KERNEL_ARGS = (
    "noxsave",                  # xrstor64 cannot be emulated; clearing CPUID.XSAVE is not honoured
    # Leaf-7 and other bits are not honoured in KVM_SET_CPUID2 here: ask Linux to ignore them.
    # Linux reads at most 127 characters of it; cx16 is left to the CPUID mask to make room for
    # ssse3 (Debian's built-in blake2s_compress_ssse3 stopped on `movd %ecx,%xmm15`).
    "clearcpuid=smap,smep,umip,fsgsbase,rdrand,rdseed,pcid,invpcid,pku,ospke,avx,avx2,avx512f,popcnt,"
    "movbe,bmi1,bmi2,abm,adx,erms,fsrm,ssse3",
    "nopv",                     # a KVM paravirt hypercall never completed
    "tsc=reliable",             # the emulated clocksource watchdog otherwise marks the TSC unstable
    "cryptomgr.notests",        # crypto self-tests run through the emulator (Debian's kernel: minutes)
)


class Profile:
    def __init__(self, name, cpuid_masks, kernel_args, fixups, pass_tsc_khz=False, syscall_hook=False):
        self.name = name
        self.cpuid_masks = cpuid_masks
        self.kernel_args = kernel_args
        self.fixups = fixups
        self.pass_tsc_khz = pass_tsc_khz
        self.syscall_hook = syscall_hook        # where the host needs it (vcpu_worker.syscall_hook.needed)

    def kernel_cmdline(self, cmdline, tsc_khz=0):
        """`cmdline` plus this profile's arguments, keeping any the user already set (by key).

        With pass_tsc_khz, Linux is told the TSC frequency KVM reports: nested
        hosts give it no PIT, HPET or PM timer to calibrate against, and it
        would fall back to the jiffies clocksource.
        """
        words = cmdline.split()
        keys = {w.split("=", 1)[0] for w in words}
        args = list(self.kernel_args)
        if self.pass_tsc_khz and tsc_khz:
            args.append(f"tsc_early_khz={tsc_khz}")
        extra = [a for a in args if a.split("=", 1)[0] not in keys]
        return " ".join(words + extra)

    def describe(self):
        """For `hvctl info`: what this profile changes (the SYSCALL hook as this host's probe decided, if it ran)."""
        hook = "off"
        if self.syscall_hook:
            from pyhv.vcpu_worker.syscall_hook import describe_host
            hook = describe_host()
        return {"name": self.name,
                "cpuid_masks": [f"leaf 0x{leaf:x} {reg}[{bit}]: {why}" for leaf, _, reg, bit, why in self.cpuid_masks],
                "kernel_args": list(self.kernel_args),
                "fixups": list(self.fixups),
                "syscall_hook": hook,
                "tsc_early_khz": self.pass_tsc_khz}


PROFILES = {
    "nested": Profile("nested", NESTED_CPUID_MASKS, NESTED_KERNEL_ARGS, ("int3", "fwait", "mxcsr"), pass_tsc_khz=True,
                      syscall_hook=True),
    "none": Profile("none", (), (), ()),
}


def profile(name):
    return PROFILES[name]
