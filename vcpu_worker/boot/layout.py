"""Where the VMM puts its own tables in guest-physical memory below 1 MiB.

The interface promises raw32/raw64 guests that memory below 0x100000 other
than their image belongs to the VMM; Linux gets the same layout.
"""

GDT_ADDR = 0x500            # 8 descriptors + a 16-byte TSS descriptor
IDT_ADDR = 0x600            # empty IDT (limit 0) for raw guests
TSS_ADDR = 0x700            # 104-byte 64-bit TSS
BOOT_PARAMS_ADDR = 0x7000   # Linux zero page (struct boot_params, 4 KiB)
PML4_ADDR = 0x9000          # identity map of the first 4 GiB with 2 MiB pages
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # four page directories: 0xB000..0xEFFF
CMDLINE_ADDR = 0x20000      # kernel command line
CMDLINE_MAX = 0x10000
MPTABLE_ADDR = 0x9FC00      # MP floating pointer + table (top of base memory)
EBDA_START = 0x9FC00        # e820: usable RAM ends here below 1 MiB
HIMEM_START = 0x100000      # default load address of raw32/raw64/user64 images
RAW16_LOAD_ADDR = 0x7C00

# KVM's own areas (real-mode TSS and EPT identity map), inside the 32-bit hole.
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
KVM_TSS_ADDR = 0xFFFBD000

# GDT selectors.  0x10/0x18 are what the Linux boot protocol expects
# (__BOOT_CS/__BOOT_DS); 0x2B/0x33 follow the SYSRET layout.
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_USER_DATA = 0x28 | 3
SEL_USER_CODE64 = 0x30 | 3
SEL_TSS = 0x38
