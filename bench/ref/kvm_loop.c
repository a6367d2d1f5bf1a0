/* kvm_loop: the smallest useful KVM VMM, the reference the benchmarks compare hvctl with.
 *
 *   kvm_loop IMAGE
 *
 * Raw KVM API only.  Builds the VM the way the project does for `--boot raw64`
 * (see vcpu_worker/machine.py, boot/cpu_state.py, boot/layout.py): 128 MiB of
 * memfd RAM, identity-map and TSS addresses, in-kernel irqchip and PIT, the
 * supported CPUID, then 64-bit long mode with the first 4 GiB identity-mapped
 * by 2 MiB pages, a flat 64-bit CS, the GDT/TSS/page tables at the same
 * guest-physical addresses, RIP = 0x100000, RDI = 0, RSI = 1, RFLAGS = 2.
 * So the very same guest binary runs under both.
 *
 * Exits: port-I/O write to 0x80 -> ignored; to 0x3F8 -> the bytes go to stdout
 * (unbuffered, one write per exit, so a reader can timestamp them); one-byte
 * write to 0x501 -> exit with that value; anything else -> message, exit 70.
 * At the end one line on stderr:
 *   kvm_loop: exits=N run_s=S exits_per_s=R first_byte_s=F
 * where run_s is from the first KVM_RUN to the exit-port write and first_byte_s
 * is from main() to the first COM1 byte (-1 if none).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE   (128ul << 20)
#define LOAD_ADDR  0x100000ul
#define GDT_ADDR   0x500
#define IDT_ADDR   0x600
#define TSS_ADDR   0x700
#define PML4_ADDR  0x9000
#define PDPT_ADDR  0xA000
#define PD_ADDR    0xB000
#define SEL_CODE64 0x10
#define SEL_DATA   0x18
#define SEL_TSS    0x38
#define PORT_POST  0x80
#define PORT_COM1  0x3F8
#define PORT_EXIT  0x501

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "kvm_loop: %s: %s\n", what, strerror(errno));
    exit(70);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die(what);
    return r;
}

static void segment(struct kvm_segment *s, uint16_t sel, int code)
{
    memset(s, 0, sizeof *s);
    s->limit = 0xFFFFFFFF;
    s->selector = sel;
    s->type = code ? 0xB : 0x3;
    s->present = s->s = s->g = 1;
    s->l = code;
    s->db = !code;
}

/* GDT, TSS and identity page tables, exactly where cpu_state.write_tables puts them. */
static void write_tables(uint8_t *mem)
{
    uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
    gdt[SEL_CODE64 / 8] = 0x00AF9A000000FFFFull;
    gdt[SEL_DATA / 8] = 0x00CF92000000FFFFull;
    uint64_t base = TSS_ADDR, limit = 103;
    gdt[SEL_TSS / 8] = limit | (base & 0xFFFFFF) << 16 | 0x89ull << 40 | (base >> 24 & 0xFF) << 56;
    uint64_t flags = 0x7;                                   /* present, writable, user */
    *(uint64_t *)(mem + PML4_ADDR) = PDPT_ADDR | flags;
    for (int i = 0; i < 4; i++)
        ((uint64_t *)(mem + PDPT_ADDR))[i] = (PD_ADDR + i * 4096) | flags;
    for (uint64_t i = 0; i < 2048; i++)
        ((uint64_t *)(mem + PD_ADDR))[i] = i << 21 | flags | 0x80;  /* 2 MiB page */
}

static void set_long_mode(int vcpu)
{
    struct kvm_sregs s;
    xioctl(vcpu, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
    segment(&s.cs, SEL_CODE64, 1);
    segment(&s.ds, SEL_DATA, 0);
    s.es = s.fs = s.gs = s.ss = s.ds;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = SEL_TSS + 16 - 1;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 0;
    memset(&s.tr, 0, sizeof s.tr);
    s.tr.base = TSS_ADDR;
    s.tr.limit = 103;
    s.tr.selector = SEL_TSS;
    s.tr.type = 0xB;
    s.tr.present = 1;
    s.cr3 = PML4_ADDR;
    s.cr4 = 0x620;                          /* PAE | OSFXSR | OSXMMEXCPT */
    s.cr0 = 0x80050033;                     /* PE MP ET NE WP AM PG */
    s.efer = 0x500;                         /* LME | LMA */
    xioctl(vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS");

    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = LOAD_ADDR;
    r.rflags = 2;
    r.rdi = 0;
    r.rsi = 1;
    xioctl(vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS");
}

static void set_cpuid(int kvm, int vcpu)
{
    size_t size = sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, size);
    c->nent = 256;
    xioctl(kvm, KVM_GET_SUPPORTED_CPUID, c, "KVM_GET_SUPPORTED_CPUID");
    xioctl(vcpu, KVM_SET_CPUID2, c, "KVM_SET_CPUID2");
    free(c);
}

int main(int argc, char **argv)
{
    double t_main = now(), t_first_byte = -1, t_run = 0;
    unsigned long long exits = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: kvm_loop IMAGE\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    int memfd = memfd_create("guest-ram", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, MEM_SIZE) < 0)
        die("memfd");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem};
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
    uint64_t identity = 0xFFFBC000;
    xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity, "KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = 0};
    xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

    FILE *f = fopen(argv[1], "rb");
    if (!f)
        die(argv[1]);
    size_t n = fread(mem + LOAD_ADDR, 1, MEM_SIZE - LOAD_ADDR, f);
    fclose(f);
    if (n == 0) {
        fprintf(stderr, "kvm_loop: %s: empty image\n", argv[1]);
        return 2;
    }
    write_tables(mem);

    int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    set_cpuid(kvm, vcpu);
    set_long_mode(vcpu);

    t_run = now();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        exits++;
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            switch (run->io.port) {
            case PORT_POST:
                continue;
            case PORT_COM1:
                if (t_first_byte < 0)
                    t_first_byte = now();
                if (write(1, data, (size_t)run->io.size * run->io.count) < 0)
                    die("write stdout");
                continue;
            case PORT_EXIT:
                if (run->io.size == 1) {
                    double t = now() - t_run;
                    fprintf(stderr, "kvm_loop: exits=%llu run_s=%.6f exits_per_s=%.0f first_byte_s=%.6f\n",
                            exits, t, exits / t, t_first_byte < 0 ? -1 : t_first_byte - t_main);
                    return data[0];
                }
                break;
            }
            fprintf(stderr, "kvm_loop: unexpected OUT to port 0x%x, size %u\n", run->io.port, run->io.size);
        } else if (run->exit_reason == KVM_EXIT_IO) {
            fprintf(stderr, "kvm_loop: unexpected IN from port 0x%x\n", run->io.port);
        } else {
            fprintf(stderr, "kvm_loop: unexpected exit reason %u\n", run->exit_reason);
        }
        return 70;
    }
}
