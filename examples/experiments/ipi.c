/* IPI round trip through the local APIC (raw64: RING 0, which the nested
 * machines EMULATE instruction by instruction; keep TRIALS * ROUNDS small).
 *
 * vCPU 0 builds an IDT (exceptions -> report and exit, vector 0x40 = ping,
 * 0x41 = pong, 0xFF = spurious, anything else = counted as stray), every
 * vCPU loads it, masks the legacy PIC and LAPIC LINT0/LINT1, enables its
 * LAPIC (spurious vector register bit 8) and does `sti`.  Then vCPU 0 sends
 * fixed IPI 0x40 to APIC ID 1 (ICR at 0xFEE00310/0xFEE00300); vCPU 1's
 * handler sends 0x41 back to APIC ID 0 and EOIs (write 0 to 0xFEE000B0);
 * vCPU 0's handler counts the pong and EOIs.  WAIT selects how both sides
 * wait: WAIT_HLT (`sti; hlt`, the vCPU sleeps in the host kernel) or
 * WAIT_SPIN (spin with interrupts enabled).  WARMUP round trips, then
 * TRIALS trials of ROUNDS, each timed with rdtsc on vCPU 0; a round trip
 * that takes more than ~2 s of TSC ends the run.  vCPU 0 prints
 *   ipi ring=R wait=W round_trips=M trials=T tsc_khz=F completed=D pings=P pongs=Q stray=S
 *       apic_id0=A apic_id1=B stuck=0|1                             (one line)
 *   ipi_trial trial=I cycles=C                    (one per completed trial)
 * and ends the VM with 102 if all round trips completed, 2 if one got
 * stuck, 3 on an exception (after printing `exception vector=V ...`). */
#include "common.h"

#ifndef ROUNDS
#define ROUNDS 40
#endif
#ifndef TRIALS
#define TRIALS 5
#endif
#ifndef WARMUP
#define WARMUP 10
#endif
#if !defined(WAIT_HLT) && !defined(WAIT_SPIN)
#define WAIT_HLT 1
#endif

#define LAPIC_BASE 0xFEE00000UL
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LVT_MASKED (1u << 16)
#define ICR_ASSERT (1u << 14)
#define SVR_ENABLE (1u << 8)

#define VEC_PING 0x40
#define VEC_PONG 0x41
#define VEC_SPURIOUS 0xFF
#define KERNEL_CS 0x10           /* the VMM's 64-bit ring-0 code selector */

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }

static void send_ipi(u32 apic_id, u32 vector)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, vector | ICR_ASSERT);   /* fixed, physical, no shorthand */
}

struct gate {
    unsigned short off_lo, sel;
    unsigned char ist, type_attr;
    unsigned short off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));
static volatile u64 pings __attribute__((aligned(64)));   /* counted on vCPU 1 */
static volatile u64 pongs __attribute__((aligned(64)));   /* counted on vCPU 0 */
static volatile u64 stray __attribute__((aligned(64)));
static volatile u64 apic_ids[2];
static u64 stamp[TRIALS + 1];       /* TSC at the start of each trial, and at the end */

/* Interrupt entry stubs.  On entry RSP is 16-byte aligned minus the 40-byte
 * frame; 9 pushes (72 bytes) make it 16-byte aligned again for the call. */
#define SAVE "push %rax; push %rcx; push %rdx; push %rsi; push %rdi; push %r8; push %r9; push %r10; push %r11\n"
#define RESTORE "pop %r11; pop %r10; pop %r9; pop %r8; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
__asm__(
    ".pushsection .text\n"
    "isr_ping:\n" SAVE "call on_ping\n" RESTORE "iretq\n"
    "isr_pong:\n" SAVE "call on_pong\n" RESTORE "iretq\n"
    "isr_stray:\n" SAVE "call on_stray\n" RESTORE "iretq\n"
    "isr_spurious:\n" "iretq\n"                       /* no EOI for the spurious vector */
    /* exceptions: never return; pass the vector and the top two frame words */
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
    "exc_\\v: mov $\\v, %edi; mov (%rsp), %rsi; mov 8(%rsp), %rdx; and $-16, %rsp; call on_exception\n"
    ".endr\n"
    ".popsection\n"
    ".pushsection .rodata\n"
    ".balign 8\n"
    "exc_table:\n"
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
    ".quad exc_\\v\n"
    ".endr\n"
    ".popsection\n");
extern const u64 exc_table[32];
void isr_ping(void), isr_pong(void), isr_stray(void), isr_spurious(void);

void on_ping(void)
{
    pings = pings + 1;
    send_ipi(0, VEC_PONG);
    lapic_write(LAPIC_EOI, 0);
}

void on_pong(void)
{
    pongs = pongs + 1;
    lapic_write(LAPIC_EOI, 0);
}

void on_stray(void)
{
    stray = stray + 1;
    lapic_write(LAPIC_EOI, 0);
}

__attribute__((noreturn)) void on_exception(u64 vector, u64 word0, u64 word1)
{
    /* word0 is the error code or RIP, word1 RIP or CS, depending on the vector */
    out_s("exception");
    out_kv("vector", vector);
    out_kv("frame0", word0);
    out_kv("frame1", word1);
    out_c('\n');
    DEBUG_PAGE[0] = 3;
    for (;;)
        ;
}

static void set_gate(int vec, u64 handler)
{
    struct gate g = {
        .off_lo = handler & 0xFFFF, .sel = KERNEL_CS, .ist = 0, .type_attr = 0x8E,  /* present, DPL0, interrupt gate */
        .off_mid = (handler >> 16) & 0xFFFF, .off_hi = handler >> 32, .zero = 0,
    };
    idt[vec] = g;
}

static void build_idt(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, exc_table[v]);
    for (int v = 32; v < 256; v++)
        set_gate(v, (u64)isr_stray);
    set_gate(VEC_PING, (u64)isr_ping);
    set_gate(VEC_PONG, (u64)isr_pong);
    set_gate(VEC_SPURIOUS, (u64)isr_spurious);
}

static void cpu_setup(void)
{
    struct { unsigned short limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" :: "m"(idtr));
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);        /* the PIC's virtual wire (ExtINT on the BSP) */
    lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | VEC_SPURIOUS);
    __asm__ volatile("sti");
}

/* Wait until *word reaches target with interrupts enabled; 0 if ~2 s pass. */
static int wait_for(volatile u64 *word, u64 target, u64 limit)
{
    u64 start = rdtsc();
#ifdef WAIT_HLT
    for (;;) {
        __asm__ volatile("cli");
        if (*word >= target)
            break;
        __asm__ volatile("sti; hlt" ::: "memory");   /* sti's shadow: no wake-up is lost */
        if (rdtsc() - start > limit) {
            __asm__ volatile("sti");
            return 0;
        }
    }
    __asm__ volatile("sti");
#else
    while (*word < target)
        if (rdtsc() - start > limit)
            return 0;
#endif
    return 1;
}

long guest_main(long index, long count, long tsc_khz)
{
    if (count < 2)
        return 4;
    if (index == 0) {
        outb(0x21, 0xFF);       /* mask both legacy PICs */
        outb(0xA1, 0xFF);
        build_idt();
    }
    barrier(count, 1);
    cpu_setup();
    if (index < 2)
        apic_ids[index] = lapic_read(LAPIC_ID) >> 24;
    barrier(count, 2);
    if (index != 0) {
        for (;;) {
#ifdef WAIT_HLT
            __asm__ volatile("hlt");                 /* sleeps in the host until an interrupt */
#else
            cpu_relax();
#endif
        }
    }

    const u64 total = WARMUP + (u64)TRIALS * ROUNDS;
    u64 limit = (u64)(tsc_khz ? tsc_khz : 3000000) * 2000;   /* ~2 s */
    u64 completed = 0;
    int stuck = 0;
    for (u64 i = 1; i <= total; i++) {
        if (i > WARMUP && (i - WARMUP - 1) % ROUNDS == 0)
            stamp[(i - WARMUP - 1) / ROUNDS] = rdtsc();
        send_ipi(apic_ids[1], VEC_PING);
        if (!wait_for(&pongs, i, limit)) {
            stuck = 1;
            break;
        }
        if (i > WARMUP)
            completed++;
    }
    stamp[TRIALS] = rdtsc();
    __asm__ volatile("cli");
    out_s("ipi");
    out_kv("ring", cpl());
#ifdef WAIT_HLT
    out_ks("wait", "hlt");
#else
    out_ks("wait", "spin");
#endif
    out_kv("round_trips", ROUNDS);
    out_kv("trials", TRIALS);
    out_kv("tsc_khz", tsc_khz);
    out_kv("completed", completed);
    out_kv("pings", pings);
    out_kv("pongs", pongs);
    out_kv("stray", stray);
    out_kv("apic_id0", apic_ids[0]);
    out_kv("apic_id1", apic_ids[1]);
    out_kv("stuck", stuck);
    out_c('\n');
    for (u64 k = 0; k < completed / ROUNDS && !stuck; k++) {
        out_s("ipi_trial");
        out_kv("trial", k);
        out_kv("cycles", stamp[k + 1] - stamp[k]);
        out_c('\n');
    }
    return stuck ? 2 : 102;
}
