"""cffi build script for vcpu_worker._kvm: KVM structs, ioctl numbers and the C hot path.

API mode: the cdef below is checked against <linux/kvm.h> by the C compiler,
so a wrong field or ioctl number fails the build instead of corrupting a VM.
pyhv's own structs and functions are declared once, in csrc/hv_kvm.h, which
both the C source and the cdef read.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

CDEF = r"""
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_TRANSLATE ...
#define KVM_SET_MSRS ...
#define KVM_GET_MSRS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_SIGNAL_MSI ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_X86_DISABLE_EXITS ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IOEVENTFD_ANY_LENGTH ...

#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...


struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_dirty_log {          /* KVM_GET_DIRTY_LOG: one bit per page of the slot, fetched and cleared */
    uint32_t slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8,  r9,  r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    ...;
};

struct kvm_xsave {
    uint32_t region[1024];
    ...;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

/* KVM_SET_GSI_ROUTING: a header and a flexible array of entries.  cffi
 * allocates it with ffi.new("struct kvm_irq_routing *", {"nr": n, "entries": n})
 * (a var-sized last member takes its length from the initializer). */
struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t pad;
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
    ...;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t  pad[12];
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t  fd;
    uint32_t flags;
    ...;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t  valid;
    uint8_t  writeable;
    uint8_t  usermode;
    ...;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    unsigned long long args[4];
    ...;
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    uint32_t flags;
    ...;
};

/* Saved and restored whole (snapshots): only the fields pyhv reads are named. */
struct kvm_lapic_state { char regs[1024]; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; ...; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; ...; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_run;

#define SIGUSR1 ...
"""


def _header_cdef(path):
    """hv_kvm.h as cffi's cdef takes it: its declarations and #defines, without the other directives."""
    return "\n".join(line for line in path.read_text().splitlines()
                     if not line.startswith("#") or line.startswith("#define HV_") and len(line.split()) == 3)


ffibuilder = FFI()
ffibuilder.cdef(CDEF + _header_cdef(HERE / "csrc" / "hv_kvm.h"))
ffibuilder.set_source(
    "pyhv.vcpu_worker._kvm",
    '#include "hv_kvm.c"\n#include "lz4.c"\n',
    include_dirs=[str(HERE / "csrc")],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    depends=[str(p) for p in (HERE / "csrc").glob("*.[ch]")],
)
