/* A minimal virtio-pci (modern) driver for virtio-blk, as a raw64 ring-0 test guest.
 *
 * Ring 0 is emulated on the nested hosts (~1.6M instr/s): the driver is kept
 * small and polls the used ring (queue vector VIRTIO_MSI_NO_VECTOR, IF=0).
 * Finds 1AF4:1042 on bus 0 (config mechanism #1), walks the capabilities for
 * common/notify/device config, negotiates VERSION_1 (+FLUSH, RO if offered),
 * sets up queue 0 (16 entries), then:
 *   2. GET_ID: the id starts with "pyhv-" (then, built with -DPAUSE_AFTER_ID_MS=N, waits N ms);
 *   3. reads sectors 0..NSECT-1 in one request and checks the pattern the test
 *      wrote into the image: byte j of sector s is (s * 7 + j) & 0xFF;
 *   4. an out-of-range read (sector = capacity) gets VIRTIO_BLK_S_IOERR, an
 *      unknown request type VIRTIO_BLK_S_UNSUPP;
 *   5. writes sector 1 with (0xA5 ^ j) & 0xFF, flushes, reads it back:
 *      status OK on a writable disk; on a read-only one (VIRTIO_BLK_F_RO) the
 *      write gets VIRTIO_BLK_S_IOERR and the sector keeps its old contents;
 *   6. if the disk has at least BENCH_SECT sectors: reads them all with 4
 *      requests of 256 KiB in flight per kick and prints the rate (TSC-timed).
 * Progress goes to COM1; exit status 100 on success, else the failing step.
 */
#include "virtio_guest.h"

#define QSIZE 16
#define SPIN 20000000L
#define NSECT 8
#define BIG 0x1000000UL               /* 16 MiB: data buffers, outside the image and stack */
#define CHUNK (256 * 1024)
#define INFLIGHT 4
#define BENCH_SECT (16UL << 11)       /* 16 MiB */

static void putdec(u64 v)
{
    char b[21]; int i = 20; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    puts_(b + i);
}
static void kvd(const char *k, u64 v) { puts_(k); puts_("="); putdec(v); puts_(" "); }

struct req { u32 type; u32 reserved; u64 sector; };
static struct desc ring_desc[QSIZE] __attribute__((aligned(16)));
static volatile u16 ring_avail[3 + QSIZE] __attribute__((aligned(2)));
static volatile u32 ring_used[2 + 2 * QSIZE] __attribute__((aligned(4)));
static struct req hdr[INFLIGHT];
static volatile u8 status[INFLIGHT];
static u8 idbuf[20];

static u64 common, notify_addr, devcfg;
static u16 avail_idx, used_seen;


/* Post request k (descriptors 3k..3k+2): header, data (writable for reads) if len, status. */
static void post(int k, u32 type, u64 sector, u64 data, u32 len, int data_writable)
{
    int d = 3 * k, i = d;
    hdr[k].type = type; hdr[k].reserved = 0; hdr[k].sector = sector;
    status[k] = 0xFF;
    ring_desc[i].addr = (u64)&hdr[k]; ring_desc[i].len = 16; ring_desc[i].flags = 1; ring_desc[i].next = i + 1;
    if (len) {
        i++;
        ring_desc[i].addr = data; ring_desc[i].len = len;
        ring_desc[i].flags = 1 | (data_writable ? 2 : 0); ring_desc[i].next = i + 1;
    }
    i++;
    ring_desc[i].addr = (u64)&status[k]; ring_desc[i].len = 1; ring_desc[i].flags = 2; ring_desc[i].next = 0;
    ring_avail[2 + avail_idx % QSIZE] = d;
    barrier();
    avail_idx++;
    ring_avail[1] = avail_idx;
}

static void kick(void) { barrier(); R16(notify_addr) = 0; }

/* Wait until `n` more used entries arrived; returns 0 or -1 on timeout. */
static int wait_used(int n)
{
    for (long i = 0; i < SPIN; i++) {
        u16 idx = (u16)(ring_used[0] >> 16);
        if ((u16)(idx - used_seen) >= n) { used_seen += n; barrier(); return 0; }
        __asm__ volatile("pause");
    }
    return -1;
}

/* One request, waited for; returns its status byte, or 0x100 on timeout. */
static int request(u32 type, u64 sector, u64 data, u32 len, int data_writable)
{
    post(0, type, sector, data, len, data_writable);
    kick();
    if (wait_used(1)) return 0x100;
    return status[0];
}

long guest_main(long index, long count, long tsc_khz)
{
    int dev = -1;
    (void)index; (void)count;
    for (int d = 0; d < 32; d++)
        if (cfg32(d, 0) == 0x10421AF4u) { dev = d; break; }
    if (dev < 0) { puts_("no virtio-blk\n"); return 1; }
    wcfg16(dev, 0x04, cfg16(dev, 0x04) | 2 | 4);
    u64 bars = cfg32(dev, 0x10) & ~0xFu;
    u32 mult = 0, qoff;
    for (int p = cfg8(dev, 0x34), n = 0; p && n < 48; p = cfg8(dev, p + 1), n++) {
        if (cfg8(dev, p) != 0x09) continue;
        u8 type = cfg8(dev, p + 3);
        u32 off = cfg32(dev, p + 8);
        if (type == 1) common = bars + off;
        if (type == 2) { notify_addr = bars + off; mult = cfg32(dev, p + 16); }
        if (type == 4) devcfg = bars + off;
    }
    if (!common || !notify_addr || !devcfg) { puts_("caps missing\n"); return 1; }

    /* init */
    R8(common + STATUS) = 0;
    for (long i = 0; R8(common + STATUS); i++) if (i > 100000) return 1;
    R8(common + STATUS) = 1;
    R8(common + STATUS) = 1 | 2;
    R32(common + DFSEL) = 0;
    u32 f0 = R32(common + DF);
    R32(common + DFSEL) = 1;
    if (!(R32(common + DF) & 1)) return 1;
    int ro = (f0 >> 5) & 1;
    R32(common + GFSEL) = 0; R32(common + GF) = f0 & ((1u << 9) | (1u << 5));   /* FLUSH, RO */
    R32(common + GFSEL) = 1; R32(common + GF) = 1;
    R8(common + STATUS) = 1 | 2 | 8;
    if (!(R8(common + STATUS) & 8)) return 1;
    R16(common + QSEL) = 0;
    if (R16(common + QSZ) < QSIZE) return 1;
    R16(common + QSZ) = QSIZE;
    R16(common + QVEC) = 0xFFFF;                   /* no interrupt: we poll */
    qoff = R16(common + QNOFF);
    notify_addr += qoff * mult;
    w64(common + QDESC, (u64)ring_desc);
    w64(common + QDRV, (u64)ring_avail);
    w64(common + QDEV, (u64)ring_used);
    R16(common + QEN) = 1;
    R8(common + STATUS) = 1 | 2 | 8 | 4;
    u64 cap = (u64)R32(devcfg) | (u64)R32(devcfg + 4) << 32;
    kvd("capacity", cap); kvd("ro", ro); kvd("seg_max", R32(devcfg + 12)); puts_("\n");
    if (cap < NSECT) return 1;

    /* step 2: GET_ID */
    if (request(8, 0, (u64)idbuf, 20, 1) != 0) return 2;
    if (idbuf[0] != 'p' || idbuf[1] != 'y' || idbuf[2] != 'h' || idbuf[3] != 'v' || idbuf[4] != '-') return 2;
    puts_("id ok\n");
#ifdef PAUSE_AFTER_ID_MS                            /* a test kills the device's service meanwhile */
    for (u64 end = rdtsc() + (u64)tsc_khz * PAUSE_AFTER_ID_MS; rdtsc() < end; )
        __asm__ volatile("pause");
#endif

    /* step 3: read NSECT sectors in one request and check the pattern */
    volatile u8 *big = (volatile u8 *)BIG;
    if (request(0, 0, BIG, NSECT * 512, 1) != 0) return 3;
    for (u32 s = 0; s < NSECT; s++)
        for (u32 j = 0; j < 512; j++)
            if (big[s * 512 + j] != (u8)(s * 7 + j)) { kvd("mismatch sector", s); kvd("byte", j); return 3; }
    puts_("read ok\n");

    /* step 4: out of range, unsupported */
    if (request(0, cap, BIG, 512, 1) != 1) return 4;
    if (request(0, cap - 1, BIG, 1024, 1) != 1) return 4;
    if (request(99, 0, BIG, 512, 1) != 2) return 4;
    puts_("errors ok\n");

    /* step 5: write sector 1, flush, read back */
    for (u32 j = 0; j < 512; j++) big[j] = (u8)(0xA5 ^ j);
    int ws = request(1, 1, BIG, 512, 0);
    int fs = request(4, 0, 0, 0, 0);
    for (u32 j = 0; j < 512; j++) big[j] = 0;
    if (request(0, 1, BIG, 512, 1) != 0) return 5;
    kvd("write-status", ws); kvd("flush-status", fs);
    if (ro) {
        if (ws != 1 || big[0] != 7 || big[1] != 8) return 5;
    } else {
        if (ws != 0 || fs != 0) return 5;
        for (u32 j = 0; j < 512; j++) if (big[j] != (u8)(0xA5 ^ j)) return 5;
    }
    puts_("write ok\n");

    /* step 6: sequential read throughput */
    if (cap >= BENCH_SECT) {
        u64 t0 = rdtsc();
        u64 sect = 0, bytes = 0;
        while (sect < BENCH_SECT) {
            for (int k = 0; k < INFLIGHT; k++) {
                post(k, 0, sect, BIG + (u64)k * CHUNK, CHUNK, 1);
                sect += CHUNK / 512;
            }
            kick();
            if (wait_used(INFLIGHT)) return 6;
            for (int k = 0; k < INFLIGHT; k++) if (status[k] != 0) return 6;
            bytes += INFLIGHT * CHUNK;
        }
        u64 us = (rdtsc() - t0) * 1000 / (tsc_khz ? tsc_khz : 1);
        kvd("bench-bytes", bytes); kvd("bench-us", us); kvd("KB/s", us ? bytes * 1000000 / 1024 / us : 0);
        puts_("\nbench ok\n");
    }
    return 100;
}
