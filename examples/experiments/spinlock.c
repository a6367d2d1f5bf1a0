/* Spinlock contention (user64: ring 3, native).
 *
 * A test-and-test-and-set spinlock: `lock xchg` to take it, and while it is
 * held spin on a plain load with `pause`.  Every vCPU does WARMUP lock/unlock
 * pairs, then TRIALS trials of ITERS pairs each, around a tiny critical
 * section that increments a shared, non-atomic counter.  Each trial starts
 * at a barrier; every vCPU takes rdtsc around its own loop (KVM keeps the
 * vCPUs' TSCs in sync).  Short trials repeated, rather than one long run,
 * because the host's other processes deschedule vCPU threads now and then:
 * the runner reports the median and best trial.  vCPU 0 checks the counter
 * and prints
 *   spinlock ring=R vcpus=N iters=K trials=T warmup=W tsc_khz=F counter=V expected=E
 *   spinlock_trial trial=I span=C busy=B        (one per trial)
 * span = last loop end - first loop start over all vCPUs, busy = sum of the
 * vCPUs' loop times (busy/span = how many vCPUs were inside their loop on
 * average).  The VM ends with 100 + N if counter == N * (WARMUP + T * K),
 * else 1.  ITERS, TRIALS and WARMUP come from -D. */
#include "common.h"

#ifndef ITERS
#define ITERS 20000
#endif
#ifndef TRIALS
#define TRIALS 21
#endif
#ifndef WARMUP
#define WARMUP 1000
#endif

static struct {
    volatile u32 lock;
    volatile u64 counter;           /* protected by lock; same cache line */
} shared __attribute__((aligned(64)));

/* [trial][vcpu]: loop start and end TSC, one cache line per vCPU */
static volatile u64 loop_tsc[TRIALS][MAX_VCPUS][8] __attribute__((aligned(64)));

static inline void spin_lock(volatile u32 *l)
{
    for (;;) {
        u32 old = 1;
        __asm__ volatile("lock xchgl %0, %1" : "+r"(old), "+m"(*l) :: "memory");
        if (old == 0)
            return;
        while (*l)                  /* test: read-only spin, no bus locking */
            cpu_relax();
    }
}

static inline void spin_unlock(volatile u32 *l)
{
    __asm__ volatile("" ::: "memory");
    *l = 0;                         /* x86 stores are release */
}

static void run(u64 n)
{
    for (u64 i = 0; i < n; i++) {
        spin_lock(&shared.lock);
        shared.counter = shared.counter + 1;
        spin_unlock(&shared.lock);
    }
}

long guest_main(long index, long count, long tsc_khz)
{
    u64 round = 1;
    barrier(count, round++);
    run(WARMUP);
    for (int t = 0; t < TRIALS; t++) {
        barrier(count, round++);
        u64 t0 = rdtsc();
        run(ITERS);
        u64 t1 = rdtsc();
        loop_tsc[t][index][0] = t0;
        loop_tsc[t][index][1] = t1;
    }
    barrier(count, round++);
    if (index != 0)
        park();

    u64 expected = (u64)count * (WARMUP + (u64)TRIALS * ITERS);
    out_s("spinlock");
    out_kv("ring", cpl());
    out_kv("vcpus", count);
    out_kv("iters", ITERS);
    out_kv("trials", TRIALS);
    out_kv("warmup", WARMUP);
    out_kv("tsc_khz", tsc_khz);
    out_kv("counter", shared.counter);
    out_kv("expected", expected);
    out_c('\n');
    for (int t = 0; t < TRIALS; t++) {
        u64 first = ~0UL, last = 0, busy = 0;
        for (long i = 0; i < count; i++) {
            u64 s = loop_tsc[t][i][0], e = loop_tsc[t][i][1];
            first = s < first ? s : first;
            last = e > last ? e : last;
            busy += e - s;
        }
        out_s("spinlock_trial");
        out_kv("trial", t);
        out_kv("span", last - first);
        out_kv("busy", busy);
        out_c('\n');
    }
    return shared.counter == expected ? 100 + count : 1;
}
