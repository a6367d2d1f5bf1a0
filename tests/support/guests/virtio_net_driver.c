/* A minimal virtio-net driver (modern virtio-pci, polled, no MSI-X vectors) as a raw64 ring-0 test guest.
 *
 * Negotiates VERSION_1 | MAC, reads its MAC from the device config, posts RXQ
 * receive buffers, then every 300 ms broadcasts an Ethernet frame of type
 * 0x88B5 (local experimental) whose payload is "HELLO from <its MAC>".  On the
 * first frame of that type from another MAC it prints "got <payload>"; if the
 * payload was a HELLO it answers "ACK from <its MAC>" (unicast to the sender)
 * and exits 0 after 300 ms (so the answer leaves before the VM ends); an ACK
 * ends it at once with 0.  No answer within 60 s: exit 3.  Other frames are
 * counted and ignored.  Built with -DCHATTER it never ends by itself: it
 * prints "got ..." for every HELLO from another MAC and goes on (so a test can
 * see frames flow for as long as it likes: the guest's --timeout ends it).
 */
#include "virtio_guest.h"

#define RXQ 8
#define BUF 1536
#define HDR 12
#define ETHERTYPE 0x88B5

static struct desc rx_desc[RXQ] __attribute__((aligned(16)));
static volatile u16 rx_avail[3 + RXQ];
static volatile u32 rx_used[2 + 2 * RXQ] __attribute__((aligned(4)));
static struct desc tx_desc[2] __attribute__((aligned(16)));
static volatile u16 tx_avail[3 + 2];
static volatile u32 tx_used[2 + 2 * 2] __attribute__((aligned(4)));
static u8 rx_buf[RXQ][BUF] __attribute__((aligned(64)));
static u8 tx_buf[BUF] __attribute__((aligned(64)));
static u8 mac[6];
static char mac_text[18];
static struct vdev nic;
static struct vq rx = { .desc = rx_desc, .avail = rx_avail, .used = rx_used };
static struct vq tx = { .desc = tx_desc, .avail = tx_avail, .used = tx_used };

static void format_mac(const u8 *m, char *out)
{
    for (int i = 0; i < 6; i++) {
        out[3 * i] = "0123456789abcdef"[m[i] >> 4];
        out[3 * i + 1] = "0123456789abcdef"[m[i] & 15];
        out[3 * i + 2] = i < 5 ? ':' : 0;
    }
}

/* Send "<word> from <mac>" to `dst`; 0 once the device has taken it. */
static int send(const u8 *dst, const char *word)
{
    u8 *f = tx_buf;
    for (int i = 0; i < HDR; i++) f[i] = 0;
    f += HDR;
    for (int i = 0; i < 6; i++) { f[i] = dst[i]; f[6 + i] = mac[i]; }
    f[12] = ETHERTYPE >> 8; f[13] = ETHERTYPE & 0xFF;
    int n = 14;
    for (const char *s = word; *s; s++) f[n++] = (u8)*s;
    for (const char *s = " from "; *s; s++) f[n++] = (u8)*s;
    for (int i = 0; i < 17; i++) f[n++] = (u8)mac_text[i];
    while (n < 60) f[n++] = 0;                     /* minimum Ethernet frame */
    tx_desc[0].addr = (u64)tx_buf; tx_desc[0].len = HDR + n; tx_desc[0].flags = 0; tx_desc[0].next = 0;
    vq_post(&tx, 0);
    vq_kick(&nic, &tx);
    u32 id, len;
    for (long i = 0; i < 2000000; i++)
        if (vq_next_used(&tx, &id, &len)) return 0;
    return -1;
}

static void post_rx(u16 i)
{
    rx_desc[i].addr = (u64)rx_buf[i]; rx_desc[i].len = BUF; rx_desc[i].flags = DESC_F_WRITE; rx_desc[i].next = 0;
    vq_post(&rx, i);
}

static int starts_with(const u8 *p, long n, const char *s)
{
    long i = 0;
    for (; s[i]; i++)
        if (i >= n || p[i] != (u8)s[i]) return 0;
    return 1;
}

long guest_main(long index, long count, long tsc_khz)
{
    static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    (void)index; (void)count;
    if (vdev_find(0x10411AF4u, &nic)) { puts_("no virtio-net\n"); return 1; }
    if (!(nic.device_cfg)) { puts_("no device config\n"); return 1; }
    if (vdev_begin(&nic, 1UL << 32 | 1UL << 5)) { puts_("features refused\n"); return 1; }
    for (int i = 0; i < 6; i++) mac[i] = R8(nic.device_cfg + i);
    format_mac(mac, mac_text);
    if (vq_setup(&nic, &rx, 0, RXQ, NO_VECTOR) || vq_setup(&nic, &tx, 1, 2, NO_VECTOR)) {
        puts_("queue setup failed\n"); return 1;
    }
    if (vdev_driver_ok(&nic)) { puts_("DRIVER_OK refused\n"); return 1; }
    for (u16 i = 0; i < RXQ; i++) post_rx(i);
    vq_kick(&nic, &rx);
    puts_("mac "); puts_(mac_text); puts_("\n");

    u64 ms = tsc_khz > 0 ? (u64)tsc_khz : 1000000;
    u64 start = rdtsc(), next_hello = start, ignored = 0;
#ifndef CHATTER
#define CHATTER 0
#endif
    while (CHATTER || rdtsc() - start < 60000 * ms) {
        if (rdtsc() >= next_hello) {
            if (send(broadcast, "HELLO")) { puts_("tx stuck\n"); return 2; }
            next_hello = rdtsc() + 300 * ms;
        }
        u32 id, len;
        while (vq_next_used(&rx, &id, &len)) {
            if (id >= RXQ || len < HDR + 14 || len > BUF) { puts_("bad used entry\n"); return 2; }
            const u8 *f = rx_buf[id] + HDR;
            long n = len - HDR;
            int mine = (f[12] << 8 | f[13]) == ETHERTYPE;
            for (int i = 0; mine && i < 6 && f[6 + i] == mac[i]; i++)
                if (i == 5) mine = 0;                  /* our own frame reflected: not an answer */
            if (!mine) { ignored++; post_rx((u16)id); vq_kick(&nic, &rx); continue; }
            const u8 *payload = f + 14;
            long plen = 0;
            while (plen < n - 14 && payload[plen]) plen++;
            puts_("got "); putn((const char *)payload, plen); puts_("\n");
            if (CHATTER) { post_rx((u16)id); vq_kick(&nic, &rx); continue; }
            if (starts_with(payload, plen, "HELLO")) {
                if (send(f + 6, "ACK")) { puts_("tx stuck\n"); return 2; }
                u64 t = rdtsc();
                while (rdtsc() - t < 300 * ms) __asm__ volatile("pause");
            }
            kv("ignored", ignored); puts_("\n");
            return 0;
        }
        __asm__ volatile("pause");
    }
    puts_("timeout\n");
    return 3;
}
