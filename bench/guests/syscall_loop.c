/* A Linux user program for bench/linux_boot.py: the cost of a cheap system call, from user space.
 *
 * `syscall_loop N` makes N getppid() calls with the `syscall` instruction and prints
 * "syscall_loop: N calls in T ns: C ns a call" (T from two clock_gettime calls around the loop).
 * Freestanding (no libc): built with gcc -static -nostdlib at benchmark time.
 */
typedef unsigned long u64;

#define SYS_write 1
#define SYS_getppid 110
#define SYS_clock_gettime 228
#define SYS_exit 60

static long sys3(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

struct timespec { long sec, nsec; };

static u64 now_ns(void)
{
    struct timespec ts;
    sys3(SYS_clock_gettime, 1 /* CLOCK_MONOTONIC */, (long)&ts, 0);
    return (u64)ts.sec * 1000000000ul + (u64)ts.nsec;
}

static char *put(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *put_u64(char *p, u64 v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

__attribute__((used)) void main2(long argc, char **argv)
{
    u64 n = 10000;
    if (argc > 1) {
        n = 0;
        for (const char *s = argv[1]; *s >= '0' && *s <= '9'; s++)
            n = n * 10 + (u64)(*s - '0');
    }
    u64 t0 = now_ns();
    for (u64 i = 0; i < n; i++)
        sys3(SYS_getppid, 0, 0, 0);
    u64 t1 = now_ns();
    char buf[160], *p = buf;
    p = put(p, "syscall_loop: ");
    p = put_u64(p, n);
    p = put(p, " calls in ");
    p = put_u64(p, t1 - t0);
    p = put(p, " ns: ");
    p = put_u64(p, n ? (t1 - t0) / n : 0);
    p = put(p, " ns a call\n");
    sys3(SYS_write, 1, (long)buf, p - buf);
    sys3(SYS_exit, 0, 0, 0);
}

/* The kernel enters with argc at (%rsp), argv after it. */
__asm__(".globl _start\n_start:\n    mov (%rsp), %rdi\n    lea 8(%rsp), %rsi\n    and $-16, %rsp\n    call main2\n    hlt\n");
