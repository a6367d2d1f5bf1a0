/* Shared pieces of the ring-0 virtio test guests: port I/O, COM1 output, PCI config
 * mechanism #1, virtio-pci (modern) discovery and split virtqueues.
 * Included by the C guests in tests/; tests/guestbuild.py copies it beside the source
 * and keys its cache on it.  Loops must stay bounded: ring-0 code is emulated on the
 * nested hosts (~1.6M instructions/s). */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3F8
#define barrier() __asm__ volatile("" ::: "memory")
#define R8(a) (*(volatile u8 *)(u64)(a))
#define R16(a) (*(volatile u16 *)(u64)(a))
#define R32(a) (*(volatile u32 *)(u64)(a))

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }

static void puts_(const char *s) { while (*s) outb(COM1, (u8)*s++); }
static void putn(const char *s, long n) { for (long i = 0; i < n; i++) outb(COM1, (u8)s[i]); }
static void puthex(u64 v)
{
    char b[17];
    int i;
    for (i = 15; i >= 0; i--) { b[i] = "0123456789abcdef"[v & 15]; v >>= 4; }
    b[16] = 0;
    i = 0;
    while (i < 15 && b[i] == '0') i++;
    puts_(b + i);
}
static void kv(const char *k, u64 v) { puts_(k); puts_("=0x"); puthex(v); puts_(" "); }

/* PCI config mechanism #1 on bus 0; `dev` is the slot, function 0 */
static void cf8(int dev, int reg) { outl(0xCF8, 0x80000000u | (u32)dev << 11 | (u32)(reg & 0xFC)); }
static u32 cfg32(int dev, int reg) { cf8(dev, reg); return inl(0xCFC); }
static u16 cfg16(int dev, int reg) { cf8(dev, reg); return inw(0xCFC + (reg & 2)); }
static u8 cfg8(int dev, int reg) { cf8(dev, reg); return inb(0xCFC + (reg & 3)); }
static void wcfg32(int dev, int reg, u32 v) { cf8(dev, reg); outl(0xCFC, v); }
static void wcfg16(int dev, int reg, u16 v) { cf8(dev, reg); outw(0xCFC + (reg & 2), v); }

/* virtio_pci_common_cfg offsets */
enum { DFSEL = 0x00, DF = 0x04, GFSEL = 0x08, GF = 0x0C, CFGVEC = 0x10, NUMQ = 0x12, STATUS = 0x14,
       QSEL = 0x16, QSZ = 0x18, QVEC = 0x1A, QEN = 0x1C, QNOFF = 0x1E, QDESC = 0x20, QDRV = 0x28,
       QDEV = 0x30 };
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_NEEDS_RESET = 64 };
#define NO_VECTOR 0xFFFF
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct vdev {
    int slot;
    u64 common, notify_base, isr, device_cfg, msix_table, msix_pba;
    u32 notify_mult;
    int msix_cap;
};

/* Find PCI device `pci_id` (device << 16 | vendor) on bus 0, turn on memory decoding and bus
 * mastering, and locate its virtio capabilities in BAR 0.  0 on success. */
static int vdev_find(u32 pci_id, struct vdev *d)
{
    d->slot = -1;
    for (int s = 0; s < 32; s++)
        if (cfg32(s, 0) == pci_id) { d->slot = s; break; }
    if (d->slot < 0) return -1;
    int dev = d->slot;
    wcfg16(dev, 0x04, cfg16(dev, 0x04) | 2 | 4);
    u64 bar = cfg32(dev, 0x10) & ~0xFu;
    int found = 0;
    d->msix_cap = 0;
    for (int p = cfg8(dev, 0x34), n = 0; p && n < 48; p = cfg8(dev, p + 1), n++) {
        u8 id = cfg8(dev, p);
        if (id == 0x11) { d->msix_cap = p; continue; }
        if (id != 0x09 || cfg8(dev, p + 4) != 0) continue;
        u8 type = cfg8(dev, p + 3);
        u64 at = bar + cfg32(dev, p + 8);
        if (type == 1) { d->common = at; found |= 1; }
        if (type == 2) { d->notify_base = at; d->notify_mult = cfg32(dev, p + 16); found |= 2; }
        if (type == 3) { d->isr = at; found |= 4; }
        if (type == 4) { d->device_cfg = at; found |= 8; }
    }
    if (d->msix_cap) {
        d->msix_table = bar + (cfg32(dev, d->msix_cap + 4) & ~7u);
        d->msix_pba = bar + (cfg32(dev, d->msix_cap + 8) & ~7u);
    }
    return (found & 7) == 7 ? 0 : -2;
}

static int vdev_reset(struct vdev *d)
{
    R8(d->common + STATUS) = 0;
    for (long i = 0; i < 1000; i++)
        if (R8(d->common + STATUS) == 0) return 0;
    return -1;
}

/* reset, ACKNOWLEDGE, DRIVER, offer `features` (must include VERSION_1, bit 32), FEATURES_OK */
static int vdev_begin(struct vdev *d, u64 features)
{
    if (vdev_reset(d)) return -1;
    R8(d->common + STATUS) = S_ACK;
    R8(d->common + STATUS) = S_ACK | S_DRIVER;
    R32(d->common + DFSEL) = 0; u64 offered = R32(d->common + DF);
    R32(d->common + DFSEL) = 1; offered |= (u64)R32(d->common + DF) << 32;
    if ((offered & features) != features) return -2;
    R32(d->common + GFSEL) = 0; R32(d->common + GF) = (u32)features;
    R32(d->common + GFSEL) = 1; R32(d->common + GF) = (u32)(features >> 32);
    R8(d->common + STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK;
    return (R8(d->common + STATUS) & S_FEATURES_OK) ? 0 : -3;
}

static int vdev_driver_ok(struct vdev *d)
{
    R8(d->common + STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    return R8(d->common + STATUS) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK) ? 0 : -1;
}

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

/* A split virtqueue over caller-provided rings: desc[size], avail[3 + size] (u16), used[2 + 2 * size] (u32). */
struct vq {
    u16 index, size, notify_off, avail_idx, used_seen;
    struct desc *desc;
    volatile u16 *avail;
    volatile u32 *used;
};

static void w64(u64 a, u64 v) { R32(a) = (u32)v; R32(a + 4) = (u32)(v >> 32); }

static int vq_setup(struct vdev *d, struct vq *q, u16 index, u16 size, u16 vector)
{
    R16(d->common + QSEL) = index;
    if (R16(d->common + QSZ) < size) return -1;
    R16(d->common + QSZ) = size;
    R16(d->common + QVEC) = vector;
    q->index = index; q->size = size; q->avail_idx = q->used_seen = 0;
    q->notify_off = R16(d->common + QNOFF);
    for (int i = 0; i < 3 + size; i++) q->avail[i] = 0;
    for (int i = 0; i < 2 + 2 * size; i++) q->used[i] = 0;
    w64(d->common + QDESC, (u64)q->desc);
    w64(d->common + QDRV, (u64)q->avail);
    w64(d->common + QDEV, (u64)q->used);
    R16(d->common + QEN) = 1;
    return 0;
}

/* Make descriptor chain `head` available (no kick). */
static void vq_post(struct vq *q, u16 head)
{
    q->avail[2 + q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
}

static void vq_kick(struct vdev *d, struct vq *q)
{
    barrier();
    R16(d->notify_base + q->notify_off * d->notify_mult) = q->index;
}

/* The next used entry, if any: 1 and (*id, *len), else 0. */
static int vq_next_used(struct vq *q, u32 *id, u32 *len)
{
    u16 used_idx = (u16)(q->used[0] >> 16);
    if (used_idx == q->used_seen) return 0;
    barrier();
    *id = q->used[1 + 2 * (q->used_seen % q->size)];
    *len = q->used[2 + 2 * (q->used_seen % q->size)];
    q->used_seen++;
    return 1;
}
