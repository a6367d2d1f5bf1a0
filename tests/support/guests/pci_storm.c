/* Hostile PCI configuration from a guest (issue 14, defects 2-4), run on every vCPU at once.
 *
 * Function A is 00:01.0 (virtio-rng), B is 00:02.0 (virtio-console).  Every vCPU toggles A's memory
 * decoding TOGGLES times through ports 0xCF8/0xCFC, all at the same time (each toggle moves A's
 * notify ioeventfds in KVM).  Then vCPU 0 alone:
 *   - moves A's BAR 0 onto B's with one byte written at port 0xCFD: A stops decoding, B answers;
 *   - turns B's decoding off: A now decodes where B was; B on again: A keeps the place;
 *   - moves A back: both decode at their own BARs again;
 *   - writes 32 and 16 bits at ports 0xCFD and 0xCFF with register 0xFC selected (they run past
 *     config byte 0xFF) and reads them back (all-ones past the end).
 * Exit status 42 when every step saw what real PCI would show; else the number of the step that
 * did not.  The VM itself must never fail (70) on the way. */
#include "virtio_guest.h"

#ifndef TOGGLES
#define TOGGLES 40
#endif
#define A 1
#define B 2

static volatile unsigned long done;

static u16 numq(u32 bar) { return R16((u64)bar + NUMQ); }

long guest_main(long index, long count, long khz)
{
    for (int i = 0; i < TOGGLES; i++) {
        wcfg16(A, 0x04, 0);                      /* memory decoding off ... */
        wcfg16(A, 0x04, 6);                      /* ... and on again (with bus mastering) */
    }
    __atomic_fetch_add(&done, 1, __ATOMIC_SEQ_CST);
    if (index)
        for (;;) __asm__ volatile("pause");
    while (done != (unsigned long)count)
        __asm__ volatile("pause");

    wcfg16(A, 0x04, 6);
    wcfg16(B, 0x04, 6);
    u32 bar_a = cfg32(A, 0x10) & ~0xFu, bar_b = cfg32(B, 0x10) & ~0xFu;
    u16 nq_a = numq(bar_a), nq_b = numq(bar_b);
    kv("bar_a", bar_a); kv("bar_b", bar_b); kv("nq_a", nq_a); kv("nq_b", nq_b); puts_("\n");
    if (nq_a == 0xFFFF || nq_b == 0xFFFF || nq_a == nq_b)
        return 1;

    cf8(A, 0x10);                                /* defect 3: one byte puts A's BAR on B's */
    outb(0xCFD, (u8)(bar_b >> 8));
    if ((cfg32(A, 0x10) & ~0xFu) != bar_b)
        return 2;
    if (numq(bar_b) != nq_b || numq(bar_a) != 0xFFFF)
        return 3;
    wcfg16(B, 0x04, 0);                          /* B stops decoding: A takes the place it left */
    if (numq(bar_b) != nq_a)
        return 4;
    wcfg16(B, 0x04, 6);                          /* B may not push A out */
    if (numq(bar_b) != nq_a)
        return 5;
    wcfg32(A, 0x10, bar_a);                      /* apart again: both decode */
    if (numq(bar_a) != nq_a || numq(bar_b) != nq_b)
        return 6;

    cf8(A, 0xFC);                                /* defect 4: accesses past config byte 0xFF */
    outl(0xCFD, 0xFFFFFFFFu);
    outw(0xCFF, 0xFFFF);
    if ((inl(0xCFD) >> 24) != 0xFF || (inw(0xCFF) >> 8) != 0xFF)
        return 7;
    if (cfg32(A, 0) != 0x10441AF4u || numq(bar_a) != nq_a)
        return 8;
    puts_("pci storm survived\n");
    return 42;
}
