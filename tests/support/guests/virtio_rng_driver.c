/* A minimal virtio-pci (modern) driver for virtio-rng, as a raw64 ring-0 test guest.
 *
 * Enumerates bus 0 through config mechanism #1 (0xCF8/0xCFC, byte/word/dword
 * accesses), finds 1AF4:1044, sizes BAR 0, walks the capability list for the
 * common/notify/ISR cfg and MSI-X, then:
 *   1. FEATURES_OK is refused for a feature the device does not offer;
 *   2. the normal init (reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK,
 *      queue 0 of size 8 with MSI-X vector 0, DRIVER_OK);
 *   3. a 64-byte request: used.len == 64 and the buffer is not all zero; the
 *      vector is masked, so its PBA bit is set; unmasking it delivers the
 *      pending MSI (seen in the LAPIC IRR; interrupts stay off) and clears PBA;
 *   4. a hostile request (buffer outside RAM): returned with len 0;
 *   5. a good request after it, with the vector re-aimed at another APIC
 *      vector while masked (the route moves): its IRR bit gets set; then
 *      COM1's IRQ 4 still reaches the IOAPIC (GSI routing kept the defaults);
 *   6. a hostile avail.idx jump: the device sets DEVICE_NEEDS_RESET (and the
 *      masked config vector's PBA bit); the driver resets (status reads 0)
 *      and a fresh init serves a request again.
 * Progress goes to COM1; the exit status is 100 on success, else the step
 * number that failed.  Interrupts stay disabled throughout (IF=0).
 * Loops are bounded: ring-0 code is emulated on the nested hosts (~1.6M instr/s).
 */
#include "virtio_guest.h"

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#define QSIZE 8
#define SPIN 3000000
#define BAD_ADDR 0xF0000000UL      /* inside the PCI MMIO window: not RAM */

static struct desc ring_desc[QSIZE] __attribute__((aligned(16)));
static volatile u16 ring_avail[3 + QSIZE] __attribute__((aligned(2)));     /* flags, idx, ring[], used_event */
static volatile u32 ring_used[1 + 2 * QSIZE + 1] __attribute__((aligned(4))); /* flags|idx, {id,len}[], avail_event */
static u8 buf[64] __attribute__((aligned(64)));

static u64 common, notify_base, isr_addr, msix_table, msix_pba;
static u32 notify_mult, qnotify_off;
static u16 avail_idx, used_seen;

static int reset_device(void)
{
    R8(common + STATUS) = 0;
    for (long i = 0; i < 1000; i++)
        if (R8(common + STATUS) == 0) return 0;
    return -1;
}

static int lapic_irr(int vector)
{
    return (R32(LAPIC + 0x200 + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

static int wait_irr(int vector)
{
    for (long i = 0; i < 100000; i++)
        if (lapic_irr(vector)) return 1;
    return 0;
}

/* The normal init sequence up to DRIVER_OK; returns 0 or the failing step. */
static int init_device(int step)
{
    if (reset_device()) return step;
    R8(common + STATUS) = 1;                       /* ACKNOWLEDGE */
    R8(common + STATUS) = 1 | 2;                   /* DRIVER */
    R32(common + DFSEL) = 1;
    if (!(R32(common + DF) & 1)) return step;      /* VERSION_1 is feature bit 32 */
    R32(common + GFSEL) = 0; R32(common + GF) = 0;
    R32(common + GFSEL) = 1; R32(common + GF) = 1;
    R8(common + STATUS) = 1 | 2 | 8;               /* FEATURES_OK */
    if (!(R8(common + STATUS) & 8)) return step;
    R16(common + CFGVEC) = 1;
    if (R16(common + CFGVEC) != 1) return step;
    R16(common + QSEL) = 0;
    if (R16(common + QSZ) < QSIZE) return step;
    R16(common + QSZ) = QSIZE;
    R16(common + QVEC) = 0;
    if (R16(common + QVEC) != 0) return step;
    qnotify_off = R16(common + QNOFF);
    w64(common + QDESC, (u64)ring_desc);
    w64(common + QDRV, (u64)ring_avail);
    w64(common + QDEV, (u64)ring_used);
    R16(common + QEN) = 1;
    for (int i = 0; i < 3 + QSIZE; i++) ring_avail[i] = 0;
    for (int i = 0; i < 2 + 2 * QSIZE; i++) ring_used[i] = 0;
    avail_idx = used_seen = 0;
    R8(common + STATUS) = 1 | 2 | 8 | 4;           /* DRIVER_OK */
    if (R8(common + STATUS) != (1 | 2 | 8 | 4)) return step;
    return 0;
}

static void kick(void)
{
    barrier();
    R16(notify_base + qnotify_off * notify_mult) = 0;   /* iowrite16(queue index), like Linux */
}

/* Post one single-descriptor, device-writable request; returns used.len or -1 on timeout. */
static long request(u64 addr, u32 len)
{
    u16 d = avail_idx % QSIZE;
    ring_desc[d].addr = addr;
    ring_desc[d].len = len;
    ring_desc[d].flags = 2;                        /* VIRTQ_DESC_F_WRITE */
    ring_desc[d].next = 0;
    ring_avail[2 + avail_idx % QSIZE] = d;
    barrier();
    avail_idx++;
    ring_avail[1] = avail_idx;
    kick();
    for (long i = 0; i < SPIN; i++) {
        u16 used_idx = (u16)(ring_used[0] >> 16);
        if (used_idx != used_seen) {
            barrier();
            u32 id = ring_used[1 + 2 * (used_seen % QSIZE)];
            u32 len = ring_used[2 + 2 * (used_seen % QSIZE)];
            used_seen++;
            if (id != d) return -2;
            return len;
        }
        __asm__ volatile("pause");
    }
    return -1;
}

/* With -DPRINT_BYTES each good request's bytes go to COM1 as "bytes=HEX" (a seeded device's stream, checked);
 * build it with -fno-tree-vectorize too: gcc would use SSE for the loops, which the emulator here lacks. */
static void dump(void)
{
#ifdef PRINT_BYTES
    puts_("bytes=");
    for (int i = 0; i < 64; i++) { outb(COM1, "0123456789abcdef"[buf[i] >> 4]); outb(COM1, "0123456789abcdef"[buf[i] & 15]); }
    puts_("\n");
#endif
}

static int buf_nonzero(void)
{
    u8 acc = 0;
    for (int i = 0; i < 64; i++) acc |= buf[i];
    return acc != 0;
}

static void msix_entry(int v, u32 data, int masked)
{
    u64 e = msix_table + 16 * v;
    R32(e + 12) = 1;                               /* mask while changing, as Linux does */
    R32(e + 0) = 0xFEE00000u;                      /* fixed, physical destination APIC 0 */
    R32(e + 4) = 0;
    R32(e + 8) = data;
    R32(e + 12) = masked ? 1 : 0;
}

long guest_main(long index, long count)
{
    int dev = -1, s;
    long len;
    (void)index; (void)count;

    /* step 1: bus 0 — host bridge at 00.0, the virtio-rng function somewhere */
    if (cfg32(0, 0x08) >> 16 != 0x0600) { puts_("no host bridge\n"); return 1; }
    for (int d = 0; d < 32; d++) {
        u32 id = cfg32(d, 0);
        if (id == 0x10441AF4u) { dev = d; break; }
    }
    if (dev < 0) { puts_("no virtio-rng\n"); return 1; }
    if (cfg32(31, 0) != 0xFFFFFFFFu) { puts_("empty slot not all-ones\n"); return 1; }
    if (cfg16(dev, 0x02) != 0x1044 || cfg8(dev, 0x01) != 0x1A || cfg8(dev, 0x08) != 1) {
        puts_("sub-dword config reads wrong\n"); return 1;
    }
    kv("rng-slot", dev);

    /* step 2: BAR 0 sizing with decoding off, then the capability walk */
    u16 cmd = cfg16(dev, 0x04);
    wcfg16(dev, 0x04, cmd & ~2);
    u32 bar0 = cfg32(dev, 0x10);
    wcfg32(dev, 0x10, 0xFFFFFFFFu);
    u32 size = ~(cfg32(dev, 0x10) & ~0xFu) + 1;
    wcfg32(dev, 0x10, bar0);
    wcfg16(dev, 0x04, cmd | 2 | 4);                /* memory decoding + bus master */
    kv("bar0", bar0); kv("size", size);
    if (size != 0x8000 || (bar0 & 0xF) != 0) return 2;
    if (!(cfg16(dev, 0x06) & 0x10)) return 2;      /* capability list present */
    u64 bars = bar0 & ~0xFu;
    int msix_cap = 0, found = 0;
    for (int p = cfg8(dev, 0x34), n = 0; p && n < 48; p = cfg8(dev, p + 1), n++) {
        u8 id = cfg8(dev, p);
        if (id == 0x11) { msix_cap = p; continue; }
        if (id != 0x09) continue;
        u8 type = cfg8(dev, p + 3), bar = cfg8(dev, p + 4);
        u32 off = cfg32(dev, p + 8);
        if (bar != 0) return 2;
        if (type == 1) { common = bars + off; found |= 1; }
        if (type == 2) { notify_base = bars + off; notify_mult = cfg32(dev, p + 16); found |= 2; }
        if (type == 3) { isr_addr = bars + off; found |= 4; }
    }
    if (found != 7 || !msix_cap) { kv("caps", found); return 2; }
    u32 tbl = cfg32(dev, msix_cap + 4), pba = cfg32(dev, msix_cap + 8);
    msix_table = bars + (tbl & ~7u);
    msix_pba = bars + (pba & ~7u);
    kv("vectors", (cfg16(dev, msix_cap + 2) & 0x7FF) + 1); kv("notify_mult", notify_mult);
    puts_("\n");

    /* step 3: FEATURES_OK must not stick for a feature the device does not offer */
    if (reset_device()) return 3;
    R8(common + STATUS) = 1 | 2;
    R32(common + GFSEL) = 0; R32(common + GF) = 1u << 5;
    R32(common + GFSEL) = 1; R32(common + GF) = 1;
    R8(common + STATUS) = 1 | 2 | 8;
    if (R8(common + STATUS) & 8) { puts_("FEATURES_OK accepted bad features\n"); return 3; }
    puts_("features-refused ok\n");

    /* step 4: LAPIC on (interrupts stay off), MSI-X on with vectors 0 and 1 masked, init */
    R32(LAPIC + 0xF0) = 0x1FF;
    msix_entry(0, 0x41, 1);
    msix_entry(1, 0x42, 1);
    wcfg16(dev, msix_cap + 2, 0x8000);             /* MSI-X enable */
    if ((s = init_device(4))) { puts_("init failed\n"); return s; }
    puts_("driver-ok\n");

    /* step 5: a good request while vector 0 is masked -> PBA pending; unmask delivers it */
    len = request((u64)buf, 64);
    kv("used.len", (u64)len);
    if (len != 64 || !buf_nonzero()) return 5;
    dump();
    if (!(R32(msix_pba) & 1)) { puts_("PBA not pending\n"); return 5; }
    if (lapic_irr(0x41)) return 5;
    R32(msix_table + 12) = 0;                      /* unmask vector 0 */
    if (!wait_irr(0x41)) { puts_("pending MSI not delivered\n"); return 5; }
    if (R32(msix_pba) & 1) { puts_("PBA still pending\n"); return 5; }
    puts_("request-1 ok, pending MSI delivered on unmask\n");

    /* step 6: hostile buffer address -> len 0, nothing written */
    len = request(BAD_ADDR, 64);
    kv("hostile used.len", (u64)len);
    if (len != 0) return 6;
    puts_("\n");

    /* step 7: the route moves with the entry: vector 0 now sends 0x51, unmasked */
    msix_entry(0, 0x51, 0);
    for (int i = 0; i < 64; i++) buf[i] = 0;
    len = request((u64)buf, 64);
    if (len != 64 || !buf_nonzero()) return 7;
    dump();
    if (!wait_irr(0x51)) { puts_("MSI on the new route not seen\n"); return 7; }
    puts_("request-2 ok, live MSI delivered\n");

    /* step 7b: MSI routes replaced KVM's GSI table; legacy IRQ 4 must still reach the IOAPIC.
     * IOAPIC pin 4 -> vector 0x60 (edge, fixed, APIC 0); the PIC is masked; the 8250
     * raises IRQ 4 once THRE interrupts are enabled (OUT2 set). */
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    R32(IOAPIC) = 0x10 + 2 * 4 + 1; R32(IOAPIC + 0x10) = 0;
    R32(IOAPIC) = 0x10 + 2 * 4;     R32(IOAPIC + 0x10) = 0x60;
    outb(COM1 + 4, 0x08);                          /* MCR: OUT2 */
    outb(COM1 + 1, 0x02);                          /* IER: THRE interrupt */
    int irq4 = wait_irr(0x60);
    outb(COM1 + 1, 0x00);
    R32(IOAPIC) = 0x10 + 2 * 4;     R32(IOAPIC + 0x10) = 0x10000;   /* masked again */
    if (!irq4) { puts_("IRQ 4 lost after GSI routing update\n"); return 7; }
    puts_("irq4 ok\n");

    /* step 8: avail.idx jumps by more than the queue size -> DEVICE_NEEDS_RESET */
    avail_idx += 100;
    ring_avail[1] = avail_idx;
    kick();
    for (long i = 0; i < SPIN && !(R8(common + STATUS) & 64); i++)
        __asm__ volatile("pause");
    if (!(R8(common + STATUS) & 64)) { puts_("no DEVICE_NEEDS_RESET\n"); return 8; }
    if (!(R32(msix_pba) & 2)) { puts_("config vector not pending\n"); return 8; }
    if (!(R8(isr_addr) & 2) || R8(isr_addr) != 0) { puts_("ISR config bit wrong\n"); return 8; }
    puts_("needs-reset ok\n");

    /* step 9: reset and re-init: the device serves again */
    if ((s = init_device(9))) return s;
    R32(msix_table + 12) = 1;                      /* (vector 0 masked: PBA will show it) */
    for (int i = 0; i < 64; i++) buf[i] = 0;
    len = request((u64)buf, 64);
    if (len != 64 || !buf_nonzero()) return 9;
    dump();
    puts_("after-reset request ok\n");
    return 100;
}
