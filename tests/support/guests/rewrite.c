/* A guest that rewrites its RAM all the time, for pre-copy migration: every pass writes each page of MIB MiB
 * (two words: the pass number and the page index mixed with it), then checks every page, so a page the
 * migration left stale (a write the dirty log missed) ends the guest with status 3.  Every EVERY passes it prints
 * the pass number; after LAST passes it exits 0.  Built for user64 (ring 3 runs natively here: the rewriting is
 * as fast as the machine), so it talks through the debug page.  One vCPU. */
#ifndef MIB
#define MIB 64
#endif
#ifndef EVERY
#define EVERY 16
#endif
#ifndef LAST
#define LAST 4000
#endif
#define DEBUG_PAGE 0xFEBFF000UL
#define BASE (16UL << 20)

static void putc_(char c) { *(volatile unsigned char *)(DEBUG_PAGE + 1) = c; }
static void put_num(unsigned long v)
{
    char b[24]; int i = 23; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    while (b[i]) putc_(b[i++]);
}

long guest_main(long index, long count, long tsc_khz)
{
    volatile unsigned long *ram = (volatile unsigned long *)BASE;
    const unsigned long pages = MIB * 256UL;
    for (unsigned long pass = 1; pass <= LAST; pass++) {
        for (unsigned long p = 0; p < pages; p++) {
            ram[p * 512] = pass;
            ram[p * 512 + 1] = p ^ (pass << 32);
        }
        for (unsigned long p = 0; p < pages; p++)
            if (ram[p * 512] != pass || ram[p * 512 + 1] != (p ^ (pass << 32))) {
                const char *s = "stale page ";
                while (*s) putc_(*s++);
                put_num(p);
                putc_('\n');
                return 3;
            }
        if (pass % EVERY == 0) {
            put_num(pass);
            putc_('\n');
        }
    }
    return 0;
}
