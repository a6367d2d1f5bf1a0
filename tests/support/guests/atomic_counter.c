/* SMP guest: every vCPU adds 1 to a shared counter ITERATIONS times with a
 * locked instruction; vCPU 0 waits for all, checks the total, prints it on
 * the debug page and exits with 100 + vCPU count if it is exact (1 if not).
 * ITERATIONS is set with -D at build time. */
#define DEBUG_PAGE ((volatile unsigned char *)0xFEBFF000UL)

static volatile unsigned long counter;
static volatile unsigned long finished;

static void putc_(char c) { DEBUG_PAGE[1] = (unsigned char)c; }

static void put_dec(unsigned long v)
{
    char buf[24];
    int n = 0;
    do { buf[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc_(buf[--n]);
}

long guest_main(long index, long count)
{
    for (long i = 0; i < ITERATIONS; i++)
        __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&finished, 1, __ATOMIC_SEQ_CST);
    if (index != 0)
        for (;;) __asm__ volatile("pause");
    while (finished != (unsigned long)count)
        __asm__ volatile("pause");
    put_dec(counter);
    putc_('\n');
    return counter == (unsigned long)count * ITERATIONS ? 100 + count : 1;
}
