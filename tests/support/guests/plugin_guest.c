/* The guest of the plugin tests (tests/kvm/test_plugins.py); -DSCENARIO=n picks what it does:
 *  1 (failure): vCPU 0 writes and reads back the Scratch plugin at PORT (or MMIO when -DMMIO=addr), then reads
 *    offset 4, where the plugin fails; every later read must be all-ones and writes dropped.  It prints each
 *    value, "alive" and then a dot every STEP_MS, for ever (the test stops it).
 *  2 (irq): the Crc32 plugin at 0x300 with irq=5: IOAPIC pin 5 -> vector 0x45 (PIC masked, interrupts off), a
 *    checksum of a message, then the vector's LAPIC IRR bit must be set; a range outside RAM sets BAD_RANGE.
 *    Exits 100 on success, else the step that failed.
 *  3 (smp): every vCPU writes the Counter plugin at 0x310 WRITES times; vCPU 0 waits for all and exits
 *    100 if its count reads WRITES * vCPUs, else prints it and exits 1.
 *  4 (overlap): vCPU 0 reads the Scratch plugin's slow register; meanwhile vCPU 1 makes 50 Python-handled exits
 *    (COM1 scratch register) and raises a flag; vCPU 0 exits 100 if the flag was up when its read returned
 *    (the other vCPU ran while one waited for the plugin), 1 if not.
 *  5 (counter): vCPU 0 writes the Counter plugin at 0x310 once every STEP_MS and prints the count it reads back
 *    after each write, COUNT times, then exits 0 (a snapshot taken in between must continue the count).
 */
#include "virtio_guest.h"

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#ifndef PORT
#define PORT 0x300
#endif
#ifndef STEP_MS
#define STEP_MS 20
#endif
#ifndef WRITES
#define WRITES 200
#endif
#ifndef COUNT
#define COUNT 200
#endif

static volatile u32 finished, flag;
static const char msg[] = "The quick brown fox jumps over the lazy dog";

static void delay_ms(long tsc_khz, long ms)
{
    u64 end = rdtsc() + (u64)tsc_khz * ms;
    while (rdtsc() < end) __asm__ volatile("pause");
}

#ifdef MMIO
static u32 rd32(int off) { return R32(MMIO + off); }
static void wr32(int off, u32 v) { R32(MMIO + off) = v; }
#else
static u32 rd32(int off) { return inl(PORT + off); }
static void wr32(int off, u32 v) { outl(PORT + off, v); }
#endif

static long failure(long tsc_khz)
{
    wr32(0, 0x11223344);
    kv("before", rd32(0));
    kv("failing", rd32(4));
    kv("after", rd32(0));
    wr32(0, 0x55667788);
    kv("rewritten", rd32(0));
    puts_("alive\n");
    for (;;) {
        delay_ms(tsc_khz, STEP_MS);
        outb(COM1, '.');
    }
}

static long irq(void)
{
    outb(0x21, 0xff); outb(0xa1, 0xff);                 /* PIC masked */
    R32(LAPIC + 0xF0) = 0x1FF;                          /* LAPIC on, interrupts stay off */
    R32(IOAPIC) = 0x10 + 2 * 5 + 1; R32(IOAPIC + 0x10) = 0;
    R32(IOAPIC) = 0x10 + 2 * 5;     R32(IOAPIC + 0x10) = 0x45;     /* edge, fixed, unmasked, APIC 0 */
    if (R32(LAPIC + 0x200 + 0x10 * (0x45 / 32)) >> (0x45 % 32) & 1) return 1;
    wr32(0, (u32)(u64)msg); wr32(4, 0); wr32(8, sizeof msg - 1); wr32(0xC, 1);
    if (rd32(0x14) != 1) return 2;
    kv("crc", rd32(0x10));
    for (long i = 0; i < 100000; i++)
        if (R32(LAPIC + 0x200 + 0x10 * (0x45 / 32)) >> (0x45 % 32) & 1) goto seen;
    return 3;
seen:
    wr32(0, 0xF0000000u); wr32(4, 0); wr32(8, 16); wr32(0xC, 1);   /* in the PCI window: not RAM */
    if (rd32(0x14) != 3) return 4;
    puts_("\n");
    return 100;
}

static long smp(long index, long count)
{
    for (long i = 0; i < WRITES; i++)
        outl(0x310, 1);
    __atomic_fetch_add(&finished, 1, __ATOMIC_SEQ_CST);
    if (index)
        for (;;) __asm__ volatile("pause");
    while (finished != (u32)count)
        __asm__ volatile("pause");
    u32 n = inl(0x310);
    if (n == (u32)(WRITES * count)) return 100;
    kv("count", n);
    return 1;
}

static long overlap(long index)
{
    if (index == 1) {
        while (!flag) __asm__ volatile("pause");
        for (int i = 0; i < 50; i++) outb(COM1 + 7, (u8)i);        /* 8250 scratch: each one a Python exit */
        flag = 2;
        for (;;) __asm__ volatile("pause");
    }
    flag = 1;
    rd32(0);                                                      /* the slow register */
    return flag == 2 ? 100 : 1;
}

static long counter(long tsc_khz)
{
    for (int i = 0; i < COUNT; i++) {
        outl(0x310, 1);
        kv("n", inl(0x310));
        puts_("\n");
        delay_ms(tsc_khz, STEP_MS);
    }
    return 0;
}

long guest_main(long index, long count, long tsc_khz)
{
    switch (SCENARIO) {
    case 1: if (index) for (;;) __asm__ volatile("pause"); return failure(tsc_khz);
    case 2: if (index) for (;;) __asm__ volatile("pause"); return irq();
    case 3: return smp(index, count);
    case 4: if (index > 1) for (;;) __asm__ volatile("pause"); return overlap(index);
    case 5: if (index) for (;;) __asm__ volatile("pause"); return counter(tsc_khz);
    }
    return 99;
}
