/* A guest whose RAM a device writes all the time, for pre-copy migration: virtio-blk reads sectors of the test
 * image (byte j of sector s is (s * 7 + j) & 0xFF) into SLOTS pages that only the device writes (the vCPU only
 * reads them), the vCPU notes which sector went where, then checks every slot.  A slot is read from another
 * sector in each pass, so a device write the migration missed leaves an older sector in its page on the target:
 * status 3.  Each pass prints its number; after PASSES passes the guest exits 100.  Interrupts stay off: the
 * driver polls the used ring.  First it touches BALLAST_MIB MiB above the slots, so that a migration's first pass
 * over RAM takes a while after it has copied the slots: the device writes them again meanwhile. */
#include "virtio_guest.h"

#define QSIZE 16
#define SPIN 20000000L
#define SLOTS 64
#define SLOT_BASE 0x1000000UL         /* 16 MiB: one page per slot */
#define SECTORS 64
#ifndef PASSES
#define PASSES 200
#endif
#ifndef BALLAST_MIB
#define BALLAST_MIB 64
#endif
#define BALLAST_BASE 0x2000000UL      /* 32 MiB */

struct req { u32 type; u32 reserved; u64 sector; };
static struct desc ring_desc[QSIZE] __attribute__((aligned(16)));
static volatile u16 ring_avail[3 + QSIZE] __attribute__((aligned(2)));
static volatile u32 ring_used[2 + 2 * QSIZE] __attribute__((aligned(4)));
static struct req hdr;
static volatile u8 status;
static u8 slot_sector[SLOTS];

static void putdec(u64 v)
{
    char b[21]; int i = 20; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    puts_(b + i);
}

static int read_sector(struct vdev *d, struct vq *q, u64 sector, u64 to)
{
    hdr.type = 0; hdr.reserved = 0; hdr.sector = sector;
    status = 0xFF;
    q->desc[0].addr = (u64)&hdr; q->desc[0].len = 16; q->desc[0].flags = DESC_F_NEXT; q->desc[0].next = 1;
    q->desc[1].addr = to; q->desc[1].len = 512; q->desc[1].flags = DESC_F_NEXT | DESC_F_WRITE; q->desc[1].next = 2;
    q->desc[2].addr = (u64)&status; q->desc[2].len = 1; q->desc[2].flags = DESC_F_WRITE; q->desc[2].next = 0;
    vq_post(q, 0);
    vq_kick(d, q);
    u32 id, len;
    for (long i = 0; i < SPIN; i++)
        if (vq_next_used(q, &id, &len)) return status;
    return 0x100;
}

long guest_main(long index, long count, long tsc_khz)
{
    struct vdev d;
    struct vq q;
    (void)count; (void)tsc_khz;
    if (index) for (;;) __asm__ volatile("hlt");
    for (u64 page = 0; page < BALLAST_MIB * 256UL; page++)
        *(volatile u8 *)(BALLAST_BASE + page * 4096) = 1;
    q.desc = ring_desc; q.avail = ring_avail; q.used = ring_used;
    if (vdev_find(0x10421AF4u, &d) || vdev_begin(&d, 1UL << 32) || vq_setup(&d, &q, 0, QSIZE, NO_VECTOR)
            || vdev_driver_ok(&d)) {
        puts_("virtio-blk set-up failed\n");
        return 1;
    }
    for (u64 pass = 1; pass <= PASSES; pass++) {
        for (int i = 0; i < SLOTS; i++) {
            u64 s = (pass * 5 + i * 3) % SECTORS;
            if (read_sector(&d, &q, s, SLOT_BASE + i * 4096UL) != 0) { puts_("read failed\n"); return 2; }
            slot_sector[i] = (u8)s;
        }
        for (int i = 0; i < SLOTS; i++) {
            volatile u8 *p = (volatile u8 *)(SLOT_BASE + i * 4096UL);
            u8 s = slot_sector[i];
            for (int j = 0; j < 512; j += 37)
                if (p[j] != (u8)(s * 7 + j)) { puts_("stale slot "); putdec(i); puts_("\n"); return 3; }
        }
        putdec(pass);
        puts_("\n");
    }
    return 100;
}
