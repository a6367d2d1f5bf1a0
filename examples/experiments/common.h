/* Shared by the experiment guests (the .c files in examples/experiments): the start stub,
 * console output through the debug page, rdtsc, and a start barrier.
 *
 * Raw boot state (docs/interface.md): every vCPU enters at the load address
 * with RDI = vCPU index, RSI = vCPU count and RDX = the TSC frequency in kHz.
 * Those are exactly the first three SysV argument registers, so the stub only
 * gives each vCPU its own stack and calls
 *     long guest_main(long index, long count, long tsc_khz);
 * whose return value ends the VM (one-byte write to the debug page).  The
 * stub is in .text.start, which run.py's linker script puts first. */
#ifndef EXPERIMENT_COMMON_H
#define EXPERIMENT_COMMON_H

#define MAX_VCPUS 64
#define STACK_SHIFT 13                        /* 8 KiB per vCPU */
#define DEBUG_PAGE ((volatile unsigned char *)0xFEBFF000UL)
#define STATUS_TOO_MANY_VCPUS 4

__asm__(
    ".pushsection .text.start, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    cmp $" "64" ", %rsi\n"               /* MAX_VCPUS stacks */
    "    ja 2f\n"
    "    lea stack_top(%rip), %rsp\n"
    "    mov %rdi, %rax\n"
    "    shl $13, %rax\n"                     /* STACK_SHIFT */
    "    sub %rax, %rsp\n"
    "    call guest_main\n"                   /* rdi, rsi, rdx pass through untouched */
    "    jmp 3f\n"
    "2:  mov $4, %eax\n"                      /* STATUS_TOO_MANY_VCPUS */
    "3:  mov $0xFEBFF000, %rbx\n"             /* a register: a disp32 would sign-extend */
    "    movb %al, (%rbx)\n"
    "1:  pause\n"
    "    jmp 1b\n"
    ".popsection\n"
    ".pushsection .bss\n"
    ".balign 4096\n"
    "stack_bottom:\n"
    "    .skip 64 * 8192\n"
    "stack_top:\n"
    ".popsection\n");

typedef unsigned long u64;
typedef unsigned int u32;

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* The privilege level this code runs at: 3 under --boot user64, 0 under raw64. */
static inline __attribute__((unused)) int cpl(void)
{
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (int)(cs & 3);
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return (u64)hi << 32 | lo;
}

static void out_c(char c) { DEBUG_PAGE[1] = (unsigned char)c; }

static void out_s(const char *s)
{
    while (*s)
        out_c(*s++);
}

static void out_u(u64 v)
{
    char buf[24];
    int n = 0;
    do { buf[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n)
        out_c(buf[--n]);
}

/* " key=value" */
static void out_kv(const char *key, u64 v)
{
    out_c(' ');
    out_s(key);
    out_c('=');
    out_u(v);
}

static __attribute__((unused)) void out_ks(const char *key, const char *v)
{
    out_c(' ');
    out_s(key);
    out_c('=');
    out_s(v);
}

/* All `count` vCPUs meet here; `round` counts up from 1 at each use. */
static volatile u64 barrier_word __attribute__((aligned(64)));
static __attribute__((unused)) void barrier(u64 count, u64 round)
{
    __atomic_fetch_add(&barrier_word, 1, __ATOMIC_SEQ_CST);
    while (barrier_word < round * count)
        cpu_relax();
}

static __attribute__((unused)) void park(void)
{
    for (;;)
        cpu_relax();
}

#endif
