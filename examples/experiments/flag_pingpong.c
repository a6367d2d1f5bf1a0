/* Shared-memory flag ping-pong between vCPU 0 and vCPU 1: the comparison
 * for the IPI experiment.  Built for user64 (ring 3: native) and for raw64
 * (ring 0: emulated on the nested machines) from this same source.
 *
 * vCPU 0 writes ping = i; vCPU 1 spins until it sees it and writes pong = i;
 * vCPU 0 spins until it sees pong = i.  ping and pong are on separate cache
 * lines.  WARMUP round trips, then TRIALS trials of ROUNDS round trips,
 * each trial timed with rdtsc on vCPU 0 (short trials, so that the runner
 * can take the median and leave out trials where the host's other processes
 * descheduled a vCPU thread).  A round trip that takes longer than about
 * 2 s of TSC ends the run.  vCPU 0 prints
 *   flag_pingpong ring=R round_trips=M trials=T tsc_khz=F completed=D
 *   flag_pingpong_trial trial=I cycles=C      (one per completed trial)
 * and ends the VM with 102 if all T * M round trips completed, else 2.
 * Other vCPUs than 0 and 1 (if any) only park. */
#include "common.h"

#ifndef ROUNDS
#define ROUNDS 5000
#endif
#ifndef TRIALS
#define TRIALS 21
#endif
#ifndef WARMUP
#define WARMUP 1000
#endif

static volatile u64 ping __attribute__((aligned(64)));
static volatile u64 pong __attribute__((aligned(64)));
static u64 stamp[TRIALS + 1];       /* TSC at the start of each trial, and at the end */

long guest_main(long index, long count, long tsc_khz)
{
    const u64 total = WARMUP + (u64)TRIALS * ROUNDS;
    if (count < 2)
        return 3;
    if (index == 1) {
        for (u64 i = 1; i <= total; i++) {
            while (ping != i)
                cpu_relax();
            pong = i;
        }
        park();
    }
    if (index != 0)
        park();

    u64 limit = (u64)(tsc_khz ? tsc_khz : 3000000) * 2000;   /* 2 s */
    u64 completed = 0;
    int stuck = 0;
    for (u64 i = 1; i <= total && !stuck; i++) {
        if (i > WARMUP && (i - WARMUP - 1) % ROUNDS == 0)
            stamp[(i - WARMUP - 1) / ROUNDS] = rdtsc();
        u64 spins = 0, start = 0;
        ping = i;
        while (pong != i) {
            cpu_relax();
            if ((++spins & 1023) == 0) {     /* rdtsc off the fast path */
                if (!start)
                    start = rdtsc();
                else if (rdtsc() - start > limit) {
                    stuck = 1;
                    break;
                }
            }
        }
        if (!stuck && i > WARMUP)
            completed++;
    }
    stamp[TRIALS] = rdtsc();
    out_s("flag_pingpong");
    out_kv("ring", cpl());
    out_kv("round_trips", ROUNDS);
    out_kv("trials", TRIALS);
    out_kv("tsc_khz", tsc_khz);
    out_kv("completed", completed);
    out_c('\n');
    for (u64 k = 0; k < completed / ROUNDS && !stuck; k++) {
        out_s("flag_pingpong_trial");
        out_kv("trial", k);
        out_kv("cycles", stamp[k + 1] - stamp[k]);
        out_c('\n');
    }
    return completed == (u64)TRIALS * ROUNDS ? 102 : 2;
}
