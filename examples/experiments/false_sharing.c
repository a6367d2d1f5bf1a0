/* False sharing (user64: ring 3, native).
 *
 * Each vCPU increments its own counter, first with a plain load-add-store
 * (`op=plain`), then with `lock add` (`op=locked`).  For each op the
 * counters are laid out three ways, one pass after another:
 *   same_line  stride 8 bytes: all counters in one 64-byte cache line
 *   padded64   stride 64: one counter per cache line (adjacent lines)
 *   padded128  stride 128: one per 128-byte block, so the adjacent-line
 *              (spatial) prefetcher does not pair them either
 * Each pass is TRIALS short trials of ITERS increments per vCPU, each
 * starting at a barrier with the counter at 0; every vCPU takes rdtsc
 * around its own loop (KVM keeps the vCPUs' TSCs in sync) and checks that
 * its counter ends at exactly ITERS.  Short repeated trials, because the
 * host's other processes deschedule vCPU threads now and then (and a trial
 * where the vCPUs did not run at the same time shows no contention: the
 * runner keeps the trials where they overlapped).  vCPU 0 prints
 *   false_sharing ring=R vcpus=N iters=K trials=T tsc_khz=F bad_counts=X
 *   false_sharing_trial op=O layout=L stride=S trial=I span=C busy=B
 * span = last loop end - first loop start over the vCPUs, busy = sum of
 * their loop times (busy/span = mean number of vCPUs inside their loop).
 * bad_counts = trials in which a vCPU's counter did not end at ITERS.
 * The VM ends with 100 + N if every counter was exact, else 1. */
#include "common.h"

#ifndef ITERS
#define ITERS 100000
#endif
#ifndef TRIALS
#define TRIALS 21
#endif

static const struct { const char *name; u64 stride; } layouts[] = {
    {"same_line", 8}, {"padded64", 64}, {"padded128", 128},
};
#define NLAYOUTS 3
static const char *const ops[] = {"plain", "locked"};
#define NOPS 2
#define NPASSES (NOPS * NLAYOUTS)

/* room for MAX_VCPUS counters at the largest stride */
static volatile unsigned char area[MAX_VCPUS * 128] __attribute__((aligned(4096)));
/* [pass][trial][vcpu]: loop start, loop end (written once per trial, after the loop) */
static volatile u64 loop_tsc[NPASSES][TRIALS][MAX_VCPUS][2] __attribute__((aligned(64)));
static volatile u64 bad_counts;

static void count_plain(volatile u64 *c)
{
    for (u64 i = 0; i < ITERS; i++)
        *c = *c + 1;
}

static void count_locked(volatile u64 *c)
{
    for (u64 i = 0; i < ITERS; i++)
        __asm__ volatile("lock addq $1, %0" : "+m"(*c) :: "memory");
}

long guest_main(long index, long count, long tsc_khz)
{
    u64 round = 1;
    for (int pass = 0; pass < NPASSES; pass++) {
        int op = pass / NLAYOUTS, l = pass % NLAYOUTS;
        volatile u64 *mine = (volatile u64 *)(area + index * layouts[l].stride);
        for (int t = 0; t < TRIALS; t++) {
            *mine = 0;
            barrier(count, round++);
            u64 t0 = rdtsc();
            if (op == 0)
                count_plain(mine);
            else
                count_locked(mine);
            u64 t1 = rdtsc();
            loop_tsc[pass][t][index][0] = t0;
            loop_tsc[pass][t][index][1] = t1;
            if (*mine != ITERS)
                __atomic_fetch_add(&bad_counts, 1, __ATOMIC_SEQ_CST);
        }
        barrier(count, round++);    /* nobody resets a counter of this pass's layout early */
    }
    if (index != 0)
        park();

    out_s("false_sharing");
    out_kv("ring", cpl());
    out_kv("vcpus", count);
    out_kv("iters", ITERS);
    out_kv("trials", TRIALS);
    out_kv("tsc_khz", tsc_khz);
    out_kv("bad_counts", bad_counts);
    out_c('\n');
    for (int pass = 0; pass < NPASSES; pass++)
        for (int t = 0; t < TRIALS; t++) {
            u64 first = ~0UL, last = 0, busy = 0;
            for (long i = 0; i < count; i++) {
                u64 s = loop_tsc[pass][t][i][0], e = loop_tsc[pass][t][i][1];
                first = s < first ? s : first;
                last = e > last ? e : last;
                busy += e - s;
            }
            out_s("false_sharing_trial");
            out_ks("op", ops[pass / NLAYOUTS]);
            out_ks("layout", layouts[pass % NLAYOUTS].name);
            out_kv("stride", layouts[pass % NLAYOUTS].stride);
            out_kv("trial", t);
            out_kv("span", last - first);
            out_kv("busy", busy);
            out_c('\n');
        }
    return bad_counts == 0 ? 100 + count : 1;
}
