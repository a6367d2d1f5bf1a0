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
    /* KVM_EXIT_INTERNAL_ERROR / FAIL_ENTRY / SYSTEM_EVENT / DEBUG */
    uint32_t suberror, ndata;
    uint64_t data[16];
    uint64_t exit_value;
};

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
};

long hv_ioctl(int fd, unsigned long req, void *arg);
long hv_ioctl_int(int fd, unsigned long req, unsigned long arg);
void *hv_map_run(int vcpu_fd, long size);
long hv_irq_line(int vm_fd, uint32_t irq, uint32_t level);
long hv_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *out, int max);
long hv_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *ents, int n);
uint32_t hv_vcpu_run(struct hv_vcpu *v, struct hv_exit *e);
void hv_set_immediate_exit(struct kvm_run *run, uint8_t value);
int hv_install_kick_handler(int sig);
int hv_kick_thread(unsigned long thread, int sig);
long hv_lz4_legacy_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

#endif
