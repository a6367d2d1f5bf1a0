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
    /* KVM_EXIT_INTERNAL_ERROR / FAIL_ENTRY / SYSTEM_EVENT / DEBUG */
    uint32_t suberror, ndata;
    uint64_t data[16];
    uint64_t exit_value;
};

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
long hv_lz4_legacy_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

#endif
