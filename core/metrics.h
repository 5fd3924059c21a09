/*
 * metrics.h -- what workers count for /metrics, in their shared-memory status slot, and
 * how the supervisor (which runs no plugin code) merges it into one view.
 *
 * Two kinds of figures live in a worker's slot (status.h, spk_wslot.hooks and .pm):
 *
 *   hook stats   per plugin (chain index) and hook: calls, errors, and a latency
 *                histogram of a sample of the calls. The call count is a plain load and
 *                store (one writer: the worker's loop); a call is timed only when the
 *                slot's sequence number (bumped on every hook entry, slot.h) has its low
 *                bits zero under `mask` (1 in 64 by default: two clock reads per 64
 *                calls, well under a nanosecond a hook on average). spk_hook_begin() and
 *                spk_hook_end() below are the one place that does it.
 *   plugin metrics  what plugins register through the ABI's metric services (spoke.h,
 *                1.4): families (name, help, type, label names, buckets) and series
 *                (label values, values). A worker appends and publishes with a release
 *                store of the count; values are updated with relaxed stores by the one
 *                writer, read by the supervisor without locks.
 *
 * The supervisor keeps a *base* (spk_metrics_base): when a worker's slot is freed its
 * counters and histograms are added to the base, so totals never go back when a worker
 * is restarted (gauges are not: a dead worker's gauge is gone with it). A scrape renders
 * base + every live slot, summed by plugin name, family name and label values.
 *
 * Plain data in the region (no pointers), as status.h requires. Doubles are stored as
 * their bit patterns in _Atomic uint64_t.
 */
#ifndef SPK_METRICS_H
#define SPK_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "slot.h"

#define SPK_METRICS_PLUGINS 64 /* = SPK_STATUS_PLUGINS; a plugin past it shares the last row */

/* ---- hook stats ------------------------------------------------------------------- */

/* Upper bounds (ns) of the hook latency histogram; a last bucket is +Inf. */
#define SPK_HOOK_BUCKETS 12
#define SPK_HOOK_BOUNDS_NS                                                                 \
    {250, 1000, 4000, 16000, 64000, 256000, 1000000, 4000000, 16000000, 64000000,          \
     256000000}
/* 1 in 256: a clock read (~25 ns) amortised to ~0.1 ns a hook, still hundreds of samples a
 * second for a plugin at 100k calls a second (docs/benchmarks.md, hooks). */
#define SPK_HOOK_SAMPLE_DEFAULT 256

typedef struct spk_hookstat {
    _Atomic uint64_t calls;
    _Atomic uint64_t errors;
    _Atomic uint64_t timed;              /* calls that were timed (the histogram's count) */
    _Atomic uint64_t sum_ns;             /* their total time */
    _Atomic uint64_t bucket[SPK_HOOK_BUCKETS]; /* timed calls per bucket (not cumulative) */
} spk_hookstat;

typedef struct spk_hookstats {
    _Atomic uint64_t mask; /* time a call when (seq & mask) == 0; UINT64_MAX: never */
    spk_hookstat h[SPK_METRICS_PLUGINS][SPK_HOOK_COUNT];
} spk_hookstats;

/* Where a process without a status slot counts (tools, tests, --single-process): a
 * process-local sink nobody reads. */
extern spk_hookstat spk_hookstat_sink[SPK_HOOK_COUNT];

/* The row of plugin `index` in hs (never NULL: the sink when hs is NULL). */
static inline spk_hookstat *spk_hookstats_row(spk_hookstats *hs, unsigned index)
{
    if (hs == NULL)
        return spk_hookstat_sink;
    return hs->h[index < SPK_METRICS_PLUGINS ? index : SPK_METRICS_PLUGINS - 1];
}

/* The time-sampling mask for "1 in n calls" (n rounded down to a power of two; 0:
 * never). */
static inline uint64_t spk_hook_sample_mask(unsigned n)
{
    if (n == 0)
        return UINT64_MAX;
    uint64_t p = 1;
    while (p * 2 <= n)
        p *= 2;
    return p - 1;
}

static inline uint64_t spk_hook_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void spk_stat_inc(_Atomic uint64_t *v, uint64_t by)
{
    /* One writer: a plain load and store, no lock prefix. */
    atomic_store_explicit(v, atomic_load_explicit(v, memory_order_relaxed) + by,
                          memory_order_relaxed);
}

void spk_hook_observe(spk_hookstat *st, uint64_t ns);

/* Enter a hook (slot.h's stamp), count the call; returns the start time (ns) when this
 * call is timed, else 0. `mask` is the sampling mask (spk_hook_sample_mask). */
static inline uint64_t spk_hook_begin(spk_slot *s, spk_hookstat *st, uint64_t mask,
                                      uint32_t index, enum spk_hook_id hook)
{
    spk_slot_enter(s, index, hook);
    spk_stat_inc(&st->calls, 1);
    if (__builtin_expect((atomic_load_explicit(&s->seq, memory_order_relaxed) & mask) != 0, 1))
        return 0;
    return spk_hook_clock_ns();
}

/* The hook returned (before or after spk_slot_leave: the slot is not touched). */
static inline void spk_hook_end(spk_hookstat *st, uint64_t t0)
{
    if (__builtin_expect(t0 != 0, 0))
        spk_hook_observe(st, spk_hook_clock_ns() - t0);
}

/* ---- plugin metrics (ABI 1.4) ------------------------------------------------------- */

#define SPK_PM_FAMILIES 64
#define SPK_PM_SERIES 256
#define SPK_PM_LABELS 4     /* label names per family (besides the host's `plugin`) */
#define SPK_PM_BUCKETS 16   /* histogram bounds per family, +Inf included */
#define SPK_PM_NAME 96
#define SPK_PM_HELP 160
#define SPK_PM_LABEL 32
#define SPK_PM_VALUE 64

enum spk_pm_type { SPK_PM_COUNTER = 0, SPK_PM_GAUGE = 1, SPK_PM_HISTOGRAM = 2 };

typedef struct spk_pm_family {
    char name[SPK_PM_NAME];
    char help[SPK_PM_HELP];
    char labels[SPK_PM_LABELS][SPK_PM_LABEL];
    uint32_t type, n_labels, n_buckets, plugin; /* plugin: chain index */
    double bounds[SPK_PM_BUCKETS];              /* n_buckets bounds, the last +Inf */
} spk_pm_family;

/* v[]: counter/gauge: v[0] (a double); histogram: v[0..n_buckets) per-bucket counts (not
 * cumulative), v[SPK_PM_BUCKETS] the count, v[SPK_PM_BUCKETS + 1] the sum (a double). */
typedef struct spk_pm_series {
    uint32_t family;
    uint32_t type;
    uint32_t n_buckets;             /* a histogram's copy of its family's bounds, so that */
    double bounds[SPK_PM_BUCKETS];  /* an observation reads only its series */
    char values[SPK_PM_LABELS][SPK_PM_VALUE];
    _Atomic uint64_t v[SPK_PM_BUCKETS + 2];
} spk_pm_series;

typedef struct spk_pmetrics {
    _Atomic uint32_t n_families; /* published with release */
    _Atomic uint32_t n_series;
    spk_pm_family f[SPK_PM_FAMILIES];
    spk_pm_series s[SPK_PM_SERIES];
} spk_pmetrics;

/* Worker side, for the host's metric services (host.c). Errors are negative SPK_ codes
 * with the reason in eb (which names the metric and the rule it breaks). */
int spk_pm_register(spk_pmetrics *pm, uint32_t plugin, int type, const char *name,
                    const char *help, const char *const *labels, size_t n_labels,
                    const double *buckets, size_t n_buckets, spk_errbuf *eb);
spk_pm_series *spk_pm_series_get(spk_pmetrics *pm, uint32_t plugin, int family,
                                 const char *const *values, size_t n_values, spk_errbuf *eb);

/* Prometheus's rules: a metric name [a-zA-Z_:][a-zA-Z0-9_:]*, a label name
 * [a-zA-Z_][a-zA-Z0-9_]* not starting with "__". */
bool spk_metric_name_ok(const char *s);
bool spk_label_name_ok(const char *s);

/* ---- the supervisor's side ---------------------------------------------------------- */

struct spk_wslot;
typedef struct spk_metrics_base spk_metrics_base; /* opaque; metrics.c */

/* A growing text buffer (the endpoint's body). Out of memory: `failed` is set and the
 * rest is dropped. */
typedef struct spk_mbuf {
    char *p;
    size_t len, cap;
    bool failed;
} spk_mbuf;
void spk_mbuf_printf(spk_mbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void spk_mbuf_add(spk_mbuf *b, const char *s, size_t n);

spk_metrics_base *spk_metrics_base_new(void);
void spk_metrics_base_free(spk_metrics_base *b);

/* A worker's slot is being freed: fold its counters and histograms (hook stats and plugin
 * metrics) into b. */
void spk_metrics_base_fold(spk_metrics_base *b, const struct spk_wslot *sl);

/* Render the hook stats and the plugin metrics of b + the live slots (used[i]) as
 * Prometheus text into out. */
void spk_metrics_render(const spk_metrics_base *b, const struct spk_wslot *slots,
                        const bool *used, size_t n_slots, spk_mbuf *out);

/* Rewrite Prometheus text (as rendered here and by the merger) as OpenMetrics 1.0:
 * counter families lose the _total suffix in TYPE/HELP (their samples keep it or gain
 * it), untyped becomes unknown, "# EOF" ends it. */
void spk_metrics_to_openmetrics(const char *text, size_t len, spk_mbuf *out);

/* Append `value` escaped as a label value (\\, \", \n). */
void spk_mbuf_label_value(spk_mbuf *b, const char *value);

#endif
