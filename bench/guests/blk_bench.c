/* virtio-blk throughput guest (raw64, ring 0) for bench/blk_throughput.py.
 *
 * Ring 0 is emulated on the nested hosts (~1.6M instr/s), so the guest only
 * posts requests and reaps completions: it never touches the data.  It polls
 * the used ring (queue vector VIRTIO_MSI_NO_VECTOR) and refills each slot as
 * soon as its request completes, kicking once per scan of the used ring.
 * Driver set-up is tests/support/guests/virtio_blk_driver.c's (virtio-pci modern).
 *
 * Compile-time parameters (-D):
 *   SEQ_CHUNK, SEQ_DEPTH   sequential read of the whole disk: SEQ_CHUNK bytes a
 *                          request, SEQ_DEPTH requests in flight;
 *   SEQ_BUFS               distinct data buffers the sequential slots use
 *                          (slot k reads into buffer k % SEQ_BUFS; default one each);
 *   RAND_DEPTH, RAND_MS    4 KiB reads at random 4 KiB-aligned offsets,
 *                          RAND_DEPTH in flight, for RAND_MS milliseconds
 *                          (0: skip).
 * Prints (COM1) "tsc_khz=.. capacity=..", then "seq bytes=B us=U" and
 * "rand ios=N us=U" (TSC-timed: RDX at entry = TSC kHz), exits 0 on success,
 * else the failing step.
 */
#include "virtio_guest.h"        /* tests/support/guests: port I/O, COM1, PCI config, common-cfg offsets */

#ifndef SEQ_CHUNK
#define SEQ_CHUNK (1024 * 1024)
#endif
#ifndef SEQ_DEPTH
#define SEQ_DEPTH 8
#endif
#ifndef RAND_DEPTH
#define RAND_DEPTH 16
#endif
#ifndef SEQ_BUFS                       /* distinct data buffers the slots cycle through */
#define SEQ_BUFS SEQ_DEPTH
#endif
#ifndef RAND_MS
#define RAND_MS 3000
#endif

#define QSIZE 64                       /* 3 descriptors a request: up to 21 in flight */
#define MAXDEPTH 16
#define SPIN 200000000L
#define BUF 0x2000000UL                /* 32 MiB: data buffers, one per slot, never read */
#define RAND_BLOCK 4096

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
static struct req hdr[MAXDEPTH];
static volatile u8 status[MAXDEPTH];

static u64 common, notify_addr, devcfg;
static u16 avail_idx, used_seen;

/* Slot k's descriptors (3k..3k+2: header, data, status) are set up once; a request only sets the sector. */
static void setup_slot(int k, u64 data, u32 len)
{
    int d = 3 * k;
    hdr[k].type = 0; hdr[k].reserved = 0;
    ring_desc[d].addr = (u64)&hdr[k]; ring_desc[d].len = 16; ring_desc[d].flags = 1; ring_desc[d].next = d + 1;
    ring_desc[d + 1].addr = data; ring_desc[d + 1].len = len; ring_desc[d + 1].flags = 1 | 2; ring_desc[d + 1].next = d + 2;
    ring_desc[d + 2].addr = (u64)&status[k]; ring_desc[d + 2].len = 1; ring_desc[d + 2].flags = 2; ring_desc[d + 2].next = 0;
}

static void post(int k, u64 sector)
{
    hdr[k].sector = sector;
    status[k] = 0xFF;
    ring_avail[2 + avail_idx % QSIZE] = 3 * k;
    barrier();
    avail_idx++;
    ring_avail[1] = avail_idx;
}

static void kick(void) { barrier(); R16(notify_addr) = 0; }

static u64 rng_state = 0x9E3779B97F4A7C15UL;
static u64 next_rand(u64 nblocks)
{
    rng_state = rng_state * 6364136223846793005UL + 1442695040888963407UL;
    return (rng_state >> 33) % nblocks;
}

/* Keep `depth` requests in flight until `total` are done (or, with deadline, until the TSC passes it).
 * seq: slot requests walk the disk in order; else random 4 KiB blocks.  Returns completed requests, -1 on error. */
static long pump(int depth, u64 total, u64 deadline, int seq, u64 chunk_sect, u64 nblocks)
{
    u64 posted = 0, done = 0, next_sect = 0;
    int stop = 0;
    for (int k = 0; k < depth && posted < total; k++, posted++) {
        post(k, seq ? next_sect : next_rand(nblocks) * (RAND_BLOCK / 512));
        next_sect += chunk_sect;
    }
    kick();
    long spin = 0;
    while (done < posted) {
        u16 idx = (u16)(ring_used[0] >> 16);
        if (idx == used_seen) {
            if (++spin > SPIN) return -1;
            continue;
        }
        spin = 0;
        int reposted = 0;
        if (deadline && rdtsc() > deadline) stop = 1;
        while (used_seen != idx) {
            u32 id = ring_used[1 + 2 * (used_seen % QSIZE)];
            int k = id / 3;
            used_seen++;
            done++;
            if (status[k] != 0) { kvd("bad-status", status[k]); kvd("slot", k); return -1; }
            if (!stop && posted < total) {
                post(k, seq ? next_sect : next_rand(nblocks) * (RAND_BLOCK / 512));
                next_sect += chunk_sect;
                posted++;
                reposted = 1;
            }
        }
        if (reposted) kick();
    }
    return (long)done;
}

long guest_main(long index, long count, long tsc_khz)
{
    int dev = -1;
    (void)index; (void)count;
    if (!tsc_khz) { puts_("no tsc_khz in rdx\n"); return 1; }
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

    R8(common + STATUS) = 0;
    for (long i = 0; R8(common + STATUS); i++) if (i > 100000) return 1;
    R8(common + STATUS) = 1;
    R8(common + STATUS) = 1 | 2;
    R32(common + DFSEL) = 1;
    if (!(R32(common + DF) & 1)) return 1;
    R32(common + GFSEL) = 0; R32(common + GF) = 0;
    R32(common + GFSEL) = 1; R32(common + GF) = 1;          /* VERSION_1 only */
    R8(common + STATUS) = 1 | 2 | 8;
    if (!(R8(common + STATUS) & 8)) return 1;
    R16(common + QSEL) = 0;
    if (R16(common + QSZ) < QSIZE) return 1;
    R16(common + QSZ) = QSIZE;
    R16(common + QVEC) = 0xFFFF;                             /* no interrupt: we poll */
    qoff = R16(common + QNOFF);
    notify_addr += qoff * mult;
    w64(common + QDESC, (u64)ring_desc);
    w64(common + QDRV, (u64)ring_avail);
    w64(common + QDEV, (u64)ring_used);
    R16(common + QEN) = 1;
    R8(common + STATUS) = 1 | 2 | 8 | 4;
    u64 cap = (u64)R32(devcfg) | (u64)R32(devcfg + 4) << 32;
    kvd("tsc_khz", tsc_khz); kvd("capacity", cap); puts_("\n");

    /* 1: sequential read of the whole disk */
    u64 chunk_sect = SEQ_CHUNK / 512;
    u64 nreq = cap / chunk_sect;
    if (SEQ_DEPTH > MAXDEPTH || RAND_DEPTH > MAXDEPTH || nreq == 0) return 2;
    for (int k = 0; k < SEQ_DEPTH; k++) setup_slot(k, BUF + (u64)(k % SEQ_BUFS) * SEQ_CHUNK, SEQ_CHUNK);
    u64 t0 = rdtsc();
    long n = pump(SEQ_DEPTH, nreq, 0, 1, chunk_sect, 0);
    u64 t1 = rdtsc();
    if (n != (long)nreq) return 3;
    kvd("seq bytes", nreq * SEQ_CHUNK); kvd("us", (t1 - t0) * 1000 / tsc_khz); puts_("\n");

    /* 2: random 4 KiB reads */
    if (RAND_MS) {
        for (int k = 0; k < RAND_DEPTH; k++) setup_slot(k, BUF + (u64)k * RAND_BLOCK, RAND_BLOCK);
        t0 = rdtsc();
        n = pump(RAND_DEPTH, ~0UL, t0 + (u64)RAND_MS * tsc_khz, 0, 0, cap / (RAND_BLOCK / 512));
        t1 = rdtsc();
        if (n <= 0) return 4;
        kvd("rand ios", n); kvd("us", (t1 - t0) * 1000 / tsc_khz); puts_("\n");
    }
    puts_("done\n");
    return 0;
}
