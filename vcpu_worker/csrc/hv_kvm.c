/* The worker's C hot path: ioctl wrappers and the KVM_RUN loop.
 *
 * Compiled by cffi in API mode against <linux/kvm.h>, so every struct layout
 * and ioctl number is checked by the C compiler.  The run loop absorbs the
 * port-I/O exits that need no Python (POST port, unclaimed ports) and counts
 * every exit per reason; anything else is handed back to Python in one
 * struct hv_exit.  cffi releases the GIL around these calls, so vCPU threads
 * run in parallel.
 */
#include <errno.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#include "hv_kvm.h"

static uint64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ioctl returning the result, or -errno. */
long hv_ioctl(int fd, unsigned long req, void *arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

long hv_ioctl_int(int fd, unsigned long req, unsigned long arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

void *hv_map_run(int vcpu_fd, long size)
{
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void hv_unmap_run(void *run, long size)
{
    munmap(run, (size_t)size);
}

long hv_irq_line(int vm_fd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level l;
    memset(&l, 0, sizeof l);
    l.irq = irq;
    l.level = level;
    return hv_ioctl(vm_fd, KVM_IRQ_LINE, &l);
}

/* KVM_GET_SUPPORTED_CPUID into out[max]; returns the entry count or -errno. */
long hv_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *out, int max)
{
    char buf[sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2)];
    struct kvm_cpuid2 *c = (struct kvm_cpuid2 *)buf;
    if (max > 256)
        max = 256;
    memset(buf, 0, sizeof buf);
    c->nent = (uint32_t)max;
    long r = hv_ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
    if (r < 0)
        return r;
    memcpy(out, c->entries, c->nent * sizeof(struct kvm_cpuid_entry2));
    return c->nent;
}

long hv_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *ents, int n)
{
    char buf[sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2)];
    struct kvm_cpuid2 *c = (struct kvm_cpuid2 *)buf;
    if (n > 256)
        return -E2BIG;
    memset(buf, 0, sizeof buf);
    c->nent = (uint32_t)n;
    memcpy(c->entries, ents, (size_t)n * sizeof(struct kvm_cpuid_entry2));
    return hv_ioctl(vcpu_fd, KVM_SET_CPUID2, c);
}

static void hv_fill_exit(struct hv_vcpu *v, struct hv_exit *e)
{
    struct kvm_run *run = v->run;
    e->reason = run->exit_reason;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        e->io_dir = run->io.direction;
        e->io_size = run->io.size;
        e->io_port = run->io.port;
        e->io_count = run->io.count;
        e->io_data = (char *)run + run->io.data_offset;
        break;
    case KVM_EXIT_MMIO:
        e->mmio_addr = run->mmio.phys_addr;
        e->mmio_len = run->mmio.len;
        e->mmio_write = run->mmio.is_write;
        e->mmio_data = (char *)run->mmio.data;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        e->suberror = run->internal.suberror;
        e->ndata = run->internal.ndata > 16 ? 16 : run->internal.ndata;
        memcpy(e->data, run->internal.data, e->ndata * sizeof(uint64_t));
        break;
    case KVM_EXIT_FAIL_ENTRY:
        e->data[0] = run->fail_entry.hardware_entry_failure_reason;
        e->data[1] = run->fail_entry.cpu;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        e->suberror = run->system_event.type;
        break;
    case KVM_EXIT_DEBUG:            /* suberror: the exception (1 #DB, 3 #BP); data: pc, dr6, dr7 */
        e->suberror = run->debug.arch.exception;
        e->data[0] = run->debug.arch.pc;
        e->data[1] = run->debug.arch.dr6;
        e->data[2] = run->debug.arch.dr7;
        break;
    case KVM_EXIT_X86_WRMSR:        /* suberror: KVM's reason; data: index, value */
        e->suberror = run->msr.reason;
        e->ndata = 2;
        e->data[0] = run->msr.index;
        e->data[1] = run->msr.data;
        break;
    default:
        break;
    }
}

/* Absorb a port exit in C if the port table says so.
 * Returns 1 if absorbed, 2 if it ended the VM, 0 if Python must handle it. */
static int hv_fast_io(struct hv_vcpu *v, struct hv_exit *e)
{
    struct kvm_run *run = v->run;
    uint8_t action = v->port_action[run->io.port];
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    switch (action) {
    case HV_PORT_SINK:
    case HV_PORT_UNCLAIMED:
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset(data, 0xff, (size_t)run->io.size * run->io.count);
        v->io_fast++;
        if (action == HV_PORT_UNCLAIMED)
            v->io_unclaimed++;
        return 1;
    case HV_PORT_EXIT:
        if (run->io.direction == KVM_EXIT_IO_IN) {
            memset(data, 0xff, (size_t)run->io.size * run->io.count);
            v->io_fast++;
            return 1;
        }
        e->reason = HV_EXIT_GUEST_EXIT;
        e->exit_value = data[0];
        return 2;
    default:
        return 0;
    }
}

/* A single-stepped instruction exited to user space (I/O, MMIO).  KVM here
 * completes it on the next KVM_RUN and runs on without reporting the step,
 * so that KVM_RUN gets immediate_exit: it only completes the instruction,
 * and returns HV_EXIT_STEP_DONE (or KVM's own debug exit, on hosts that
 * report the step). */
static void hv_complete_alone(struct hv_vcpu *v)
{
    v->step_io = 1;
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

static void hv_trace_exit(struct hv_vcpu *v, uint64_t t0, uint64_t t1, long r, int in_c);


static int hv_hook_exit(struct hv_vcpu *v, struct hv_exit *e, long r);
#define HV_HOOK_PASS 0          /* not the hook's: the loop goes on with the exit */
#define HV_HOOK_RESUME 1        /* handled: run the guest again */
#define HV_HOOK_PYTHON 2        /* e says what Python must do (HV_EXIT_HOOK) */

/* The rest of an exit after KVM_RUN: answered in C (HV_EXIT_ABSORBED), or filled in for Python. */
uint32_t hv_finish_exit(struct hv_vcpu *v, struct hv_exit *e)
{
    uint32_t reason = v->run->exit_reason;
    if (reason == KVM_EXIT_IO) {
        int fast = hv_fast_io(v, e);
        if (fast == 1) {
            if (v->stepping)
                hv_complete_alone(v);
            return HV_EXIT_ABSORBED;
        }
        if (fast == 2)
            return e->reason;
    }
    if (v->stepping && (reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO))
        hv_complete_alone(v);
    hv_fill_exit(v, e);
    return e->reason;
}

/* Run the vCPU until an exit Python must see.  Returns e->reason. */
uint32_t hv_vcpu_run(struct hv_vcpu *v, struct hv_exit *e)
{
    for (;;) {
        uint64_t t0 = hv_now_ns();
        if (v->last_return_ns)
            v->ns_in_vmm += t0 - v->last_return_ns;
        long r = ioctl(v->fd, KVM_RUN, 0);
        uint64_t t1 = hv_now_ns();
        v->ns_in_guest += t1 - t0;
        v->last_return_ns = t1;
        int completing = v->step_io;
        v->step_io = 0;
        int hooked = HV_HOOK_PASS;
        if (v->hook != NULL)                    /* the SYSCALL hook: its own section below */
            hooked = hv_hook_exit(v, e, r);
        if (__builtin_expect(v->trace != NULL, 0))
            hv_trace_exit(v, t0, t1, r, hooked == HV_HOOK_RESUME);
        if (hooked == HV_HOOK_RESUME)
            continue;
        if (hooked == HV_HOOK_PYTHON)
            return e->reason;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                v->exits[KVM_EXIT_INTR]++;
                e->reason = completing ? HV_EXIT_STEP_DONE : KVM_EXIT_INTR;
                return e->reason;
            }
            e->reason = HV_EXIT_ERRNO;
            e->err = errno;
            return e->reason;
        }
        uint32_t reason = v->run->exit_reason;
        if (reason < HV_NR_REASONS)
            v->exits[reason]++;
        uint32_t out = hv_finish_exit(v, e);
        if (out != HV_EXIT_ABSORBED)
            return out;
    }
}

void hv_set_immediate_exit(struct kvm_run *run, uint8_t value)
{
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

/* Kicking a vCPU out of KVM_RUN: immediate_exit plus a signal whose handler
 * does nothing and is installed without SA_RESTART, so the ioctl returns
 * EINTR.  Installed in C so no Python handler (and no interpreter state) is
 * involved, and it stays valid while the interpreter shuts down. */
#include <signal.h>
#include <pthread.h>

static void hv_kick_handler(int sig) { (void)sig; }

int hv_install_kick_handler(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hv_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL) < 0 ? -errno : 0;
}

int hv_kick_thread(unsigned long thread, int sig)
{
    return -pthread_kill((pthread_t)thread, sig);
}

/* Answer a KVM_EXIT_X86_WRMSR: 0 done (the VMM wrote the MSR), 1 the guest gets #GP. */
void hv_set_msr_error(struct kvm_run *run, uint8_t error)
{
    run->msr.error = error;
}

/* --- The SYSCALL hook (declared in hv_kvm.h; armed by vcpu_worker/syscall_hook.py) -----------
 * Everything here reads guest state from the kvm_run sync-regs area (KVM fills it on every exit
 * of a watched vCPU) and guest RAM through this process's mapping: no ioctl on the way.  Guest
 * memory is untrusted: every address is checked against the RAM ranges, page-table entries and
 * the frame are read once.
 */
#define HV_PTE_P 1ull
#define HV_PTE_PS (1ull << 7)
#define HV_PTE_ADDR 0x000ffffffffff000ull
#define HV_CR4_LA57 (1ull << 12)
#define HV_EFER_SCE 1ull
#define HV_RFLAGS_FIXED 0x2ull
#define HV_RFLAGS_IF 0x200ull
#define HV_RFLAGS_RF 0x10000ull
/* What a user RFLAGS can hold (CF PF AF ZF SF TF DF OF AC ID): R11 is cut to these, so a forged
 * R11 cannot carry IOPL, NT, RF or VM into the kernel's SYSRET. */
#define HV_RFLAGS_USER 0x240dd5ull

static uint8_t *hv_gpa_ptr(const struct hv_guest_ram *ram, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < ram->n && i < HV_GUEST_RAM_MAX; i++) {
        if (gpa >= ram->gpa[i] && gpa - ram->gpa[i] < ram->size[i] && len <= ram->size[i] - (gpa - ram->gpa[i]))
            return ram->host[i] + (gpa - ram->gpa[i]);
    }
    return NULL;
}

static uint64_t hv_guest_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, (const void *)p, sizeof v);     /* one read of guest memory the guest may be changing */
    return v;
}

/* Guest-virtual to guest-physical through the guest's own long-mode page tables (4 or 5 levels,
 * 1 GiB and 2 MiB pages).  0, or -1 if it is not mapped or a table is outside guest RAM. */
int hv_guest_walk(const struct hv_guest_ram *ram, uint64_t cr3, uint64_t cr4, uint64_t va, uint64_t *gpa)
{
    uint64_t table = cr3 & HV_PTE_ADDR;
    for (int level = (cr4 & HV_CR4_LA57) ? 5 : 4; level >= 1; level--) {
        int shift = 12 + 9 * (level - 1);
        const uint8_t *p = hv_gpa_ptr(ram, table + ((va >> shift) & 511) * 8, 8);
        if (p == NULL)
            return -1;
        uint64_t pte = hv_guest_u64(p);
        if (!(pte & HV_PTE_P))
            return -1;
        if (level == 1 || ((level == 2 || level == 3) && (pte & HV_PTE_PS))) {
            uint64_t offset = (1ull << shift) - 1;
            *gpa = ((pte & HV_PTE_ADDR) & ~offset) | (va & offset);
            return 0;
        }
        table = pte & HV_PTE_ADDR;
    }
    return -1;
}

static int hv_guest_read_u64(const struct hv_guest_ram *ram, const struct kvm_sregs *s, uint64_t va, uint64_t *out)
{
    uint64_t gpa;
    const uint8_t *p;
    if ((va & 7) || hv_guest_walk(ram, s->cr3, s->cr4, va, &gpa) || (p = hv_gpa_ptr(ram, gpa, 8)) == NULL)
        return -1;
    *out = hv_guest_u64(p);
    return 0;
}

/* Did the guest move its IDT or rewrite the #PF gate since Python armed from them? */
static int hv_hook_idt_changed(const struct hv_syscall_hook *h, const struct kvm_sregs *s)
{
    if (s->idt.base != h->idt_base || s->idt.limit != h->idt_limit)
        return 1;
    const uint8_t *gate = hv_gpa_ptr(h->ram, h->gate_gpa, 16);
    return gate != NULL && memcmp((const void *)gate, h->gate, 16) != 0;
}

static void hv_set_flat_segment(struct kvm_segment *seg, uint16_t selector, int code)
{
    memset(seg, 0, sizeof *seg);
    seg->selector = selector;
    seg->limit = 0xffffffff;
    seg->type = code ? 11 : 3;        /* execute/read accessed; read/write accessed */
    seg->present = 1;
    seg->s = 1;
    seg->l = code ? 1 : 0;
    seg->db = code ? 0 : 1;
    seg->g = 1;
}

/* Registers the hook left for KVM to load that a KVM_RUN returning early (a kick) did not take: load
 * them now, so that Python (pause, snapshot, a fix-up) never reads a vCPU behind them. */
static void hv_flush_sync_regs(struct hv_vcpu *v)
{
    struct kvm_run *run = v->run;
    int saved = errno;                  /* KVM_RUN's, which the loop reads next */
    if (run->kvm_dirty_regs & KVM_SYNC_X86_SREGS)
        ioctl(v->fd, KVM_SET_SREGS, &run->s.regs.sregs);
    if (run->kvm_dirty_regs & KVM_SYNC_X86_REGS)
        ioctl(v->fd, KVM_SET_REGS, &run->s.regs.regs);
    run->kvm_dirty_regs = 0;
    errno = saved;
}

static int hv_hook_fault(struct hv_vcpu *v, struct hv_exit *e);

/* The loop's one call, after every KVM_RUN of a watched vCPU (r: its result).  PASS: the loop goes on
 * with the exit; RESUME: handled, run again; PYTHON: e says what Python must do.  Exits it keeps from
 * the loop it counts itself. */
static int hv_hook_exit(struct hv_vcpu *v, struct hv_exit *e, long r)
{
    struct hv_syscall_hook *h = v->hook;
    struct kvm_run *run = v->run;
    if (run->kvm_dirty_regs)
        hv_flush_sync_regs(v);
    if (r < 0 || !h->watching || (run->kvm_valid_regs & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS))
            != (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS))
        return HV_HOOK_PASS;
    struct kvm_sregs *s = &run->s.regs.sregs;
    if (hv_hook_idt_changed(h, s)) {
        h->rearms++;
        if (run->exit_reason < HV_NR_REASONS)
            v->exits[run->exit_reason]++;
        e->reason = HV_EXIT_HOOK;              /* the exit itself: hv_finish_exit() once re-armed */
        e->suberror = HV_HOOK_REARM;
        return HV_HOOK_PYTHON;
    }
    if (!h->armed || run->exit_reason != KVM_EXIT_DEBUG || run->debug.arch.pc != h->handler
            || !(run->debug.arch.dr6 & 1) || s->cs.dpl != 0)
        return HV_HOOK_PASS;                        /* not DR0 at the entry: Python passes it on */
    v->exits[KVM_EXIT_DEBUG]++;
    return hv_hook_fault(v, e);
}

/* KVM_EXIT_DEBUG at the #PF entry: a system call to finish, or a fault to resume past the breakpoint. */
static int hv_hook_fault(struct hv_vcpu *v, struct hv_exit *e)
{
    struct hv_syscall_hook *h = v->hook;
    struct kvm_run *run = v->run;
    struct kvm_regs *r = &run->s.regs.regs;
    struct kvm_sregs *s = &run->s.regs.sregs;

    /* The frame the CPU pushed for the #PF: error code, RIP, CS, RFLAGS, RSP, SS. */
    uint64_t f[6];
    for (int i = 0; i < 6; i++) {
        if (hv_guest_read_u64(h->ram, s, r->rsp + 8 * (uint64_t)i, &f[i])) {
            e->reason = HV_EXIT_HOOK;
            e->suberror = HV_HOOK_NO_FRAME;
            e->ndata = 1;
            e->data[0] = r->rsp;
            return HV_HOOK_PYTHON;
        }
    }
    if ((f[2] & 3) == 3 && f[1] == h->lstar && (s->efer & HV_EFER_SCE)) {
        /* A user-mode fault at LSTAR: the SYSCALL that stayed in ring 3.  RCX (return address) and
         * R11 (user flags) are already what SYSCALL sets; do the rest and drop the frame.  (Without
         * EFER.SCE the guest gets the fault: a CPU would have raised #UD, never reached LSTAR.) */
        uint64_t r11 = (r->r11 & HV_RFLAGS_USER) | HV_RFLAGS_IF | HV_RFLAGS_FIXED;
        uint16_t cs = (uint16_t)(h->star >> 32);
        r->r11 = r11;
        r->rflags = (r11 & ~h->fmask & ~HV_RFLAGS_RF) | HV_RFLAGS_FIXED;
        r->rip = h->lstar;
        r->rsp = f[4];
        hv_set_flat_segment(&s->cs, cs & 0xfffc, 1);
        hv_set_flat_segment(&s->ss, (uint16_t)(cs + 8), 0);
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
        h->syscalls++;
        return HV_HOOK_RESUME;
    }
    /* Any other fault goes to the guest's handler: resume past its first instruction (doing what
     * it does to RFLAGS), so DR0 does not fire again.  One C cannot skip is single-stepped. */
    const uint8_t *insn = hv_gpa_ptr(h->ram, h->insn_gpa, h->skip_len ? h->skip_len : 1);
    if (h->skip_len == 0 || insn == NULL || memcmp((const void *)insn, h->insn, h->skip_len) != 0) {
        e->reason = HV_EXIT_HOOK;
        e->suberror = HV_HOOK_STEP;
        return HV_HOOK_PYTHON;
    }
    r->rip += h->skip_len;
    r->rflags = (r->rflags & ~h->skip_clear) | h->skip_set;
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    h->faults++;
    return HV_HOOK_RESUME;
}

/* Start (h) or stop (NULL) the hook on this vCPU: KVM then fills the sync-regs area on every exit. */
void hv_hook_attach(struct hv_vcpu *v, struct hv_syscall_hook *h)
{
    v->hook = h;
    v->run->kvm_valid_regs = h != NULL ? (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) : 0;
}

/* ---- Exit tracing: hv_trace_* ---------------------------------------------
 *
 * Why it is built this way is vcpu_worker/trace.py's docstring; the file
 * format is docs/trace-format.md.  In short: each vCPU owns a ring of
 * `nchunks` chunks of `chunk_recs` records and is its only producer; a full
 * chunk is published (produced++, release) and the drainer is woken through
 * an eventfd; the drainer (a Python thread blocked in hv_trace_drain, GIL
 * released) writes every published chunk behind a chunk header.  If the ring
 * is full when the vCPU needs its next chunk, the vCPU writes the pending
 * chunks itself (counted as a self-drain, with the time it took), so no
 * record is ever overwritten.  A chunk whose write fails is counted as
 * dropped (and the errno kept); those are the only records a trace can lose.
 */
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/uio.h>

struct hv_trace_ring {
    pthread_mutex_t lock;           /* held by whoever writes this ring's chunks */
    struct hv_tracer *tracer;
    struct hv_trace_rec *recs;      /* nchunks * chunk_recs */
    uint16_t vcpu;
    uint32_t fill, slot;            /* producer: records in the current chunk, its slot */
    uint64_t produced;              /* chunks published (producer stores, release) */
    uint64_t consumed;              /* chunks written or dropped (consumer stores, release) */
    uint64_t records;               /* records made (producer) */
    uint64_t written, dropped;      /* records in the file / lost to write errors (consumer) */
    uint64_t self_drains, self_drain_ns;
    int finished;
};

struct hv_tracer {
    int fd, efd;
    uint32_t nvcpus, chunk_recs, nchunks;
    pthread_mutex_t file_lock;
    int err;                        /* the first write error (errno), 0 if none */
    int sealed;                     /* the end record is written: no more chunks (under file_lock) */
    struct hv_trace_ring rings[];
};

/* CRC-32 as zlib computes it (reflected 0xEDB88320), slicing by 8. */
static uint32_t hv_crc_table[8][256];
static pthread_once_t hv_crc_once = PTHREAD_ONCE_INIT;

static void hv_crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        hv_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            hv_crc_table[t][i] = hv_crc_table[t - 1][i] >> 8 ^ hv_crc_table[0][hv_crc_table[t - 1][i] & 0xff];
}

uint32_t hv_crc32(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    pthread_once(&hv_crc_once, hv_crc_init);
    crc = ~crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = hv_crc_table[7][w & 0xff] ^ hv_crc_table[6][(w >> 8) & 0xff] ^
              hv_crc_table[5][(w >> 16) & 0xff] ^ hv_crc_table[4][(w >> 24) & 0xff] ^
              hv_crc_table[3][(w >> 32) & 0xff] ^ hv_crc_table[2][(w >> 40) & 0xff] ^
              hv_crc_table[1][(w >> 48) & 0xff] ^ hv_crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = hv_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Append one chunk (header + records) to the file; called with r->lock held.  A chunk that cannot be
 * written counts as dropped; after hv_trace_seal() nothing is written and nothing counted (the end
 * record has the counts). */
static void hv_trace_write_chunk(struct hv_trace_ring *r, uint64_t seq, const struct hv_trace_rec *recs,
                                 uint32_t n, uint16_t flags)
{
    struct hv_tracer *t = r->tracer;
    struct hv_trace_chunk h = {
        .magic = HV_TRACE_CHUNK_MAGIC, .vcpu = r->vcpu, .flags = flags, .nrec = n,
        .crc = hv_crc32(0, recs, (size_t)n * sizeof *recs), .seq = seq,
    };
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)recs, (size_t)n * sizeof *recs}};
    struct iovec *v = iov;
    int cnt = 2, err = 0;
    pthread_mutex_lock(&t->file_lock);
    if (t->sealed) {
        pthread_mutex_unlock(&t->file_lock);
        return;
    }
    while (cnt > 0) {               /* the file is O_APPEND and only written under file_lock */
        ssize_t w = writev(t->fd, v, cnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        while (cnt > 0 && (size_t)w >= v->iov_len) {
            w -= (ssize_t)v->iov_len;
            v++;
            cnt--;
        }
        if (cnt > 0) {
            v->iov_base = (char *)v->iov_base + w;
            v->iov_len -= (size_t)w;
        }
    }
    if (err && !t->err)
        t->err = err;
    pthread_mutex_unlock(&t->file_lock);
    if (err)
        r->dropped += n;            /* a partly written chunk fails its CRC: the reader says where */
    else
        r->written += n;
}

/* Write every published chunk of `r`; returns the records written. */
static long hv_trace_drain_ring(struct hv_trace_ring *r)
{
    struct hv_tracer *t = r->tracer;
    long n = 0;
    pthread_mutex_lock(&r->lock);
    uint64_t c = r->consumed;
    uint64_t p = __atomic_load_n(&r->produced, __ATOMIC_ACQUIRE);
    for (; c < p; c++) {
        hv_trace_write_chunk(r, c, &r->recs[(size_t)(c % t->nchunks) * t->chunk_recs], t->chunk_recs, 0);
        __atomic_store_n(&r->consumed, c + 1, __ATOMIC_RELEASE);
        n += t->chunk_recs;
    }
    pthread_mutex_unlock(&r->lock);
    return n;
}

/* The producer: one record into the vCPU's current chunk. */
static inline void hv_trace_put(struct hv_trace_ring *r, const struct hv_trace_rec *rec)
{
    struct hv_tracer *t = r->tracer;
    r->recs[(size_t)r->slot * t->chunk_recs + r->fill] = *rec;
    r->records++;
    if (++r->fill < t->chunk_recs)
        return;
    r->fill = 0;
    r->slot = r->slot + 1 == t->nchunks ? 0 : r->slot + 1;
    uint64_t p = r->produced + 1;
    __atomic_store_n(&r->produced, p, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(t->efd, &one, sizeof one) < 0) {
        /* cannot fail on an eventfd short of overflow; the drainer also wakes on its timeout */
    }
    if (p - __atomic_load_n(&r->consumed, __ATOMIC_ACQUIRE) >= t->nchunks) {
        /* the slot we fill next still waits for the drainer: write it ourselves rather than overwrite it */
        uint64_t t0 = hv_now_ns();
        hv_trace_drain_ring(r);
        r->self_drains++;
        r->self_drain_ns += hv_now_ns() - t0;
    }
}

/* The loop's one call site: the exit KVM_RUN just returned (r < 0: it failed with errno). */
static void __attribute__((noinline)) hv_trace_exit(struct hv_vcpu *v, uint64_t t0, uint64_t t1, long r,
                                                     int in_c)
{
    int saved_errno = errno;
    struct kvm_run *run = v->run;
    struct hv_trace_rec rec;
    memset(&rec, 0, sizeof rec);
    rec.t_ns = t1;
    rec.guest_ns = t1 - t0 > UINT32_MAX ? UINT32_MAX : (uint32_t)(t1 - t0);
    rec.vcpu = v->trace->vcpu;
    if (r < 0) {
        if (saved_errno == EINTR || saved_errno == EAGAIN) {
            rec.reason = KVM_EXIT_INTR;
        } else {
            rec.reason = HV_EXIT_ERRNO;
            rec.addr = (uint64_t)saved_errno;
        }
    } else {
        rec.reason = (uint16_t)run->exit_reason;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            size_t n = (size_t)run->io.size * run->io.count;
            rec.addr = run->io.port;
            rec.size = run->io.size;
            rec.count = run->io.count > 0xffff ? 0xffff : (uint16_t)run->io.count;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                rec.flags |= HV_TRACE_WRITE;
                memcpy(&rec.data, (char *)run + run->io.data_offset, n < 4 ? n : 4);
            }
            if (v->port_action && v->port_action[run->io.port] != HV_PORT_PYTHON)
                rec.flags |= HV_TRACE_IN_C;
            break;
        }
        case KVM_EXIT_MMIO:
            rec.addr = run->mmio.phys_addr;
            rec.size = (uint8_t)run->mmio.len;
            if (run->mmio.is_write) {
                rec.flags |= HV_TRACE_WRITE;
                memcpy(&rec.data, run->mmio.data, run->mmio.len < 4 ? run->mmio.len : 4);
            }
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            rec.addr = run->internal.suberror;
            break;
        case KVM_EXIT_FAIL_ENTRY:
            rec.addr = run->fail_entry.hardware_entry_failure_reason;
            break;
        case KVM_EXIT_SYSTEM_EVENT:
            rec.addr = run->system_event.type;
            break;
        case KVM_EXIT_DEBUG:
            rec.addr = run->debug.arch.pc;
            break;
        case KVM_EXIT_X86_WRMSR:
            rec.addr = run->msr.index;
            break;
        default:
            break;
        }
        if (in_c)                   /* the SYSCALL hook answered it (a system call or a fault resumed) */
            rec.flags |= HV_TRACE_IN_C;
    }
    hv_trace_put(v->trace, &rec);
    errno = saved_errno;
}

/* A tracer writing to `fd` (opened O_APPEND, the file's header already written), or NULL. */
struct hv_tracer *hv_trace_new(int fd, uint32_t nvcpus, uint32_t chunk_recs, uint32_t nchunks)
{
    if (nvcpus == 0 || nvcpus > 0xffff || chunk_recs == 0 || nchunks < 2)
        return NULL;
    struct hv_tracer *t = calloc(1, sizeof *t + nvcpus * sizeof t->rings[0]);
    if (!t)
        return NULL;
    t->fd = fd;
    t->nvcpus = nvcpus;
    t->chunk_recs = chunk_recs;
    t->nchunks = nchunks;
    pthread_mutex_init(&t->file_lock, NULL);
    t->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    for (uint32_t i = 0; i < nvcpus; i++) {
        struct hv_trace_ring *r = &t->rings[i];
        pthread_mutex_init(&r->lock, NULL);
        r->tracer = t;
        r->vcpu = (uint16_t)i;
        r->recs = malloc((size_t)nchunks * chunk_recs * sizeof *r->recs);
        if (!r->recs || t->efd < 0) {
            hv_trace_free(t);
            return NULL;
        }
    }
    return t;
}

struct hv_trace_ring *hv_trace_ring(struct hv_tracer *t, uint32_t vcpu)
{
    return vcpu < t->nvcpus ? &t->rings[vcpu] : NULL;
}

/* The drainer: wait up to timeout_ms for a published chunk, then write every published chunk.
 * Returns the records written. */
long hv_trace_drain(struct hv_tracer *t, int timeout_ms)
{
    struct pollfd pfd = {.fd = t->efd, .events = POLLIN};
    if (timeout_ms != 0)
        poll(&pfd, 1, timeout_ms);
    uint64_t v;
    if (read(t->efd, &v, sizeof v) < 0) {
        /* EAGAIN: woken by the timeout */
    }
    long n = 0;
    for (uint32_t i = 0; i < t->nvcpus; i++)
        n += hv_trace_drain_ring(&t->rings[i]);
    return n;
}

void hv_trace_wake(struct hv_tracer *t)
{
    uint64_t one = 1;
    if (write(t->efd, &one, sizeof one) < 0) {
        /* only on overflow, when the drainer is awake anyway */
    }
}

/* A stopped vCPU's rest: its published chunks and its partial chunk, marked LAST.  Only for a vCPU
 * whose thread has left hv_vcpu_run for good.  Returns the records written. */
long hv_trace_finish_ring(struct hv_tracer *t, uint32_t vcpu)
{
    if (vcpu >= t->nvcpus)
        return -EINVAL;
    struct hv_trace_ring *r = &t->rings[vcpu];
    long n = hv_trace_drain_ring(r);
    pthread_mutex_lock(&r->lock);
    if (!r->finished) {
        hv_trace_write_chunk(r, r->produced, &r->recs[(size_t)r->slot * t->chunk_recs], r->fill,
                             HV_TRACE_CHUNK_LAST);
        n += r->fill;
        r->fill = 0;
        r->finished = 1;
    }
    pthread_mutex_unlock(&r->lock);
    return n;
}

/* No chunk may follow the end record: a vCPU thread that outlived close() keeps its records (unflushed). */
void hv_trace_seal(struct hv_tracer *t)
{
    pthread_mutex_lock(&t->file_lock);
    t->sealed = 1;
    pthread_mutex_unlock(&t->file_lock);
}

void hv_trace_counters(struct hv_tracer *t, uint32_t vcpu, uint64_t *out)
{
    struct hv_trace_ring *r = &t->rings[vcpu];
    out[0] = __atomic_load_n(&r->records, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&r->written, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&r->dropped, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&r->self_drains, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&r->self_drain_ns, __ATOMIC_RELAXED);
    out[5] = out[0] - out[1] - out[2];
}

int hv_trace_error(struct hv_tracer *t)
{
    return t->err;
}

/* Free a tracer no vCPU uses any more (the caller closes the file). */
void hv_trace_free(struct hv_tracer *t)
{
    if (!t)
        return;
    for (uint32_t i = 0; i < t->nvcpus; i++)
        free(t->rings[i].recs);
    if (t->efd >= 0)
        close(t->efd);
    free(t);
}

/* `n` copies of `rec` (t_ns counting up) through the producer: the drain benchmark and the unit tests
 * exercise the ring, the drainer and the file without KVM. */
void hv_trace_fill(struct hv_trace_ring *r, const struct hv_trace_rec *rec, uint64_t n)
{
    struct hv_trace_rec x = *rec;
    x.vcpu = r->vcpu;
    for (uint64_t i = 0; i < n; i++, x.t_ns++)
        hv_trace_put(r, &x);
}
