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
        if (reason == KVM_EXIT_IO) {
            int fast = hv_fast_io(v, e);
            if (fast == 1) {
                if (v->stepping)
                    hv_complete_alone(v);
                continue;
            }
            if (fast == 2)
                return e->reason;
        }
        if (v->stepping && (reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO))
            hv_complete_alone(v);
        hv_fill_exit(v, e);
        return e->reason;
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
