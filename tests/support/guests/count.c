/* The counting guest of the snapshot tests: vCPU 0 prints 0..LAST, one number per line every STEP_MS (10) ms of TSC time,
 * then exits 0; every other vCPU halts.  Any restored copy must go on from exactly the next number. */
#define LAST 400
#ifndef STEP_MS
#define STEP_MS 10
#endif
static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline unsigned long rdtsc(void) { unsigned lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((unsigned long)hi << 32) | lo; }
static void put(const char *s) { while (*s) outb(0x3f8, *s++); }
long guest_main(long index, long count, long tsc_khz) {
    if (index) for (;;) __asm__ volatile("hlt");
    char buf[24];
    for (long n = 0; n <= LAST; n++) {
        int i = 22; buf[23] = 0; buf[i--] = '\n';
        long v = n; do { buf[i--] = '0' + v % 10; v /= 10; } while (v);
        put(buf + i + 1);
        unsigned long end = rdtsc() + (unsigned long)tsc_khz * STEP_MS;
        while (rdtsc() < end) __asm__ volatile("pause");
    }
    return 0;
}
