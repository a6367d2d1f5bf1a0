/* The worker's C interface, declared once: hv_kvm.c includes it and
 * kvm_build.py hands it to cffi's cdef (which reads only the lines that are
 * not preprocessor directives, plus the #defines).  Include <linux/kvm.h>
 * before it.
 */
#ifndef HV_KVM_H
#define HV_KVM_H
#include <stddef.h>
#include <stdint.h>

#define HV_NR_REASONS 64

/* port_action[] values: what the C loop does with a port-I/O exit. */
#define HV_PORT_PYTHON 0
#define HV_PORT_SINK 1
#define HV_PORT_UNCLAIMED 2
#define HV_PORT_EXIT 3

/* Pseudo exit reasons, above KVM's. */
#define HV_EXIT_GUEST_EXIT 1000
#define HV_EXIT_ERRNO 1001
/* A single-stepped instruction that exited to user space has completed. */
#define HV_EXIT_STEP_DONE 1002
#define HV_EXIT_HOOK 1003       /* the SYSCALL hook needs Python: e->suberror says why (HV_HOOK_*) */
#define HV_EXIT_ABSORBED 1004   /* hv_finish_exit(): the exit was answered in C */

/* Exit tracing (hv_kvm.c's hv_trace_* section; the file format is docs/trace-format.md).
 * Record flags: WRITE = an OUT or an MMIO write; IN_C = answered by the C loop, never
 * seen by Python.  Chunk flags: LAST = the vCPU's last chunk.  hv_trace_counters()
 * fills NCOUNTERS values: records, written, dropped, self_drains, self_drain_ns, pending. */
#define HV_TRACE_WRITE 1
#define HV_TRACE_IN_C 2
#define HV_TRACE_CHUNK_MAGIC 0x43545648
#define HV_TRACE_CHUNK_LAST 1
#define HV_TRACE_NCOUNTERS 6

struct hv_exit {
    uint32_t reason;
    int32_t err;
    /* KVM_EXIT_IO */
    uint32_t io_dir, io_size, io_port, io_count;
    char *io_data;
    /* KVM_EXIT_MMIO */
    uint64_t mmio_addr;
    uint32_t mmio_len, mmio_write;
    char *mmio_data;
    /* KVM_EXIT_INTERNAL_ERROR / FAIL_ENTRY / SYSTEM_EVENT; KVM_EXIT_DEBUG (suberror: the exception;
     * data: pc, dr6, dr7); KVM_EXIT_X86_WRMSR (suberror: KVM's reason, data: index, value);
     * HV_EXIT_HOOK (suberror: HV_HOOK_*) */
    uint32_t suberror, ndata;
    uint64_t data[16];
    uint64_t exit_value;
};

struct hv_syscall_hook;

/* One VM exit as the trace file holds it: 32 bytes, little-endian, no padding. */
struct hv_trace_rec {
    uint64_t t_ns;                  /* CLOCK_MONOTONIC when KVM_RUN returned */
    uint64_t addr;                  /* port (IO), guest-physical address (MMIO), else a reason's detail */
    uint32_t guest_ns;              /* time inside this KVM_RUN (saturates at 2^32-1) */
    uint32_t data;                  /* the first (up to) 4 bytes an OUT or MMIO write wrote */
    uint16_t reason;                /* KVM_EXIT_*, or HV_EXIT_ERRNO */
    uint16_t vcpu;
    uint8_t flags;                  /* HV_TRACE_WRITE, HV_TRACE_IN_C */
    uint8_t size;                   /* access size in bytes (IO, MMIO) */
    uint16_t count;                 /* IO repeat count of a string instruction (saturates) */
};

/* What precedes each chunk of one vCPU's records in the file. */
struct hv_trace_chunk {
    uint32_t magic;                 /* HV_TRACE_CHUNK_MAGIC */
    uint16_t vcpu;
    uint16_t flags;                 /* HV_TRACE_CHUNK_LAST */
    uint32_t nrec;
    uint32_t crc;                   /* CRC-32 (zlib's) of the nrec records */
    uint64_t seq;                   /* this vCPU's chunk number, from 0 */
};

struct hv_tracer;                   /* opaque: per-vCPU rings, the file, the drainer's wake-up */
struct hv_trace_ring;               /* one vCPU's ring of chunks */

struct hv_vcpu {
    int fd;
    struct kvm_run *run;
    const uint8_t *port_action;     /* 65536 entries, shared by the VM */
    uint64_t exits[HV_NR_REASONS];  /* every KVM exit, by reason */
    uint64_t io_fast;               /* port exits absorbed in C */
    uint64_t io_unclaimed;          /* of those, to no device */
    uint64_t ns_in_guest;           /* time inside KVM_RUN */
    uint64_t ns_in_vmm;             /* time between KVM_RUN calls */
    uint64_t last_return_ns;        /* when KVM_RUN last returned */
    uint8_t stepping;               /* single-stepping (guest_debug.py): see hv_vcpu_run */
    uint8_t step_io;                /* this KVM_RUN only completes a stepped I/O instruction */
    struct hv_trace_ring *trace;    /* NULL: not tracing (the loop's only cost then is this test) */
    struct hv_syscall_hook *hook;   /* NULL unless the SYSCALL hook watches this vCPU */
};

long hv_ioctl(int fd, unsigned long req, void *arg);
long hv_ioctl_int(int fd, unsigned long req, unsigned long arg);
void *hv_map_run(int vcpu_fd, long size);
void hv_unmap_run(void *run, long size);
long hv_irq_line(int vm_fd, uint32_t irq, uint32_t level);
long hv_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *out, int max);
long hv_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *ents, int n);
uint32_t hv_vcpu_run(struct hv_vcpu *v, struct hv_exit *e);
void hv_set_immediate_exit(struct kvm_run *run, uint8_t value);
int hv_install_kick_handler(int sig);
int hv_kick_thread(unsigned long thread, int sig);
struct hv_tracer *hv_trace_new(int fd, uint32_t nvcpus, uint32_t chunk_recs, uint32_t nchunks);
struct hv_trace_ring *hv_trace_ring(struct hv_tracer *t, uint32_t vcpu);
long hv_trace_drain(struct hv_tracer *t, int timeout_ms);
void hv_trace_wake(struct hv_tracer *t);
long hv_trace_finish_ring(struct hv_tracer *t, uint32_t vcpu);
void hv_trace_seal(struct hv_tracer *t);
void hv_trace_counters(struct hv_tracer *t, uint32_t vcpu, uint64_t *out);
int hv_trace_error(struct hv_tracer *t);
void hv_trace_free(struct hv_tracer *t);
void hv_trace_fill(struct hv_trace_ring *r, const struct hv_trace_rec *rec, uint64_t n);
uint32_t hv_crc32(uint32_t crc, const void *buf, size_t len);
void hv_set_msr_error(struct kvm_run *run, uint8_t error);
uint32_t hv_finish_exit(struct hv_vcpu *v, struct hv_exit *e);
long hv_lz4_legacy_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);


/* --- The SYSCALL hook (vcpu_worker/syscall_hook.py) ----------------------------------------
 * On nested (kvm_pvm) hosts a ring-3 SYSCALL jumps to LSTAR but stays in ring 3 and faults.
 * A hardware breakpoint (DR0) on the guest's #PF entry makes KVM_RUN return there; the C loop
 * turns a user-mode fault at LSTAR into the SYSCALL the CPU should have made and resumes any
 * other fault past the entry's first instruction.  Python arms it (syscall_hook.py).
 */
#define HV_HOOK_REARM 1         /* the guest changed its IDT: re-arm, then hv_finish_exit() */
#define HV_HOOK_STEP 2          /* a fault to resume, but C cannot skip the entry's first instruction */
#define HV_HOOK_NO_FRAME 3      /* the exception frame is not in guest RAM (data[0]: rsp) */
#define HV_GUEST_RAM_MAX 4

struct hv_guest_ram {           /* guest-physical ranges and where this process maps them */
    uint32_t n;
    uint64_t gpa[HV_GUEST_RAM_MAX];
    uint64_t size[HV_GUEST_RAM_MAX];
    uint8_t *host[HV_GUEST_RAM_MAX];
};

struct hv_syscall_hook {
    uint32_t watching;          /* sync regs on; check the IDT on every exit */
    uint32_t armed;             /* DR0 is on `handler`: handle KVM_EXIT_DEBUG there */
    uint64_t handler;           /* guest-virtual #PF entry (IDT vector 14) */
    uint64_t lstar, star, fmask;
    uint32_t skip_len;          /* the entry's first instruction: 0 if C cannot skip it */
    uint64_t skip_clear, skip_set;   /* RFLAGS bits it clears / sets (cld, clac, ...) */
    uint64_t insn_gpa;          /* where its bytes are, to see that they are still those */
    uint8_t insn[16];
    uint64_t idt_base;          /* the IDT armed from, and the #PF gate's bytes */
    uint32_t idt_limit;
    uint64_t gate_gpa;
    uint8_t gate[16];
    const struct hv_guest_ram *ram;
    uint64_t syscalls, faults, rearms;   /* counters */
};

int hv_guest_walk(const struct hv_guest_ram *ram, uint64_t cr3, uint64_t cr4, uint64_t va, uint64_t *gpa);
void hv_hook_attach(struct hv_vcpu *v, struct hv_syscall_hook *h);

#endif
