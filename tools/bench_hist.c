/*
 * bench_hist.c -- merging and reading the latency histogram (see bench_hist.h).
 *
 * Bucket i < 128 holds the value i; above, bucket (shift + 1) * 128 + k holds the values
 * whose top 8 bits are 128 + k, shift being how far they were shifted right to get them.
 * A quantile is read as the middle of its bucket's range, capped at the largest value
 * seen.
 */
#include "bench_hist.h"

/* The middle of bucket i's range of values. */
static uint64_t hist_value(unsigned i)
{
    if (i < HIST_SUB)
        return i;
    unsigned shift = i / HIST_SUB - 1;
    uint64_t lo = (uint64_t)(i % HIST_SUB + HIST_SUB) << shift;
    return lo + ((1ull << shift) - 1) / 2;
}

void spk_bench_hist_merge(spk_bench_hist *into, const spk_bench_hist *from)
{
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        into->count[i] += from->count[i];
    into->total += from->total;
    into->sum += from->sum;
    if (from->max > into->max)
        into->max = from->max;
}

uint64_t spk_bench_hist_quantile(const spk_bench_hist *h, double q)
{
    if (h->total == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)h->total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        cum += h->count[i];
        if (cum >= rank) {
            uint64_t v = hist_value(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}
