/*
 * bench_sink -- control plugin "bench-sink" for spoke-bench hub and uplink: counts the
 * payloads of its plugin ID and records each one's delivery latency,
 * received_timestamp_ms - edge_timestamp_ms (ms, as the host gives both), into the shared
 * counters of bench_stats.h at `config: { stats: PATH }`. Payloads of other IDs are passed
 * on (handled = 0). It keeps no KV state: the figures are those of hubd's own work (dedupe
 * marks, the edge registry, the group commit) plus one function call per payload.
 */
#include <string.h>

#include "bench_stats.h"
#include "spoke.h"

static const spoke_host *host;

typedef struct sink {
    uint32_t id;
    spk_bstats *st;
} sink;

static sink state;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    const char *path = host->config_get(ctx, "stats");
    if (path == NULL) {
        host->log(ctx, SPOKE_LOG_ERROR, "config.stats (the counters' file) is required");
        return SPOKE_ERR_INVALID;
    }
    state.id = args->plugin_id;
    state.st = spk_bstats_map(path);
    if (state.st == NULL) {
        host->log(ctx, SPOKE_LOG_ERROR, "cannot map %s", path);
        return SPOKE_ERR_INVALID;
    }
    atomic_fetch_add_explicit(&state.st->instances, 1, memory_order_relaxed);
    *self = &state;
    return 0;
}

static void fini(void *self)
{
    sink *s = self;
    spk_bstats_unmap(s->st);
    s->st = NULL;
}

static int accept_payload(void *self, const spoke_edge_payload *p, int *handled)
{
    sink *s = self;
    if (p->plugin_id != s->id) {
        *handled = 0;
        return 0;
    }
    int64_t d = p->received_timestamp_ms - p->edge_timestamp_ms;
    uint64_t ms = d < 0 ? 0 : (uint64_t)d;
    atomic_fetch_add_explicit(&s->st->lat_ms[ms < SPK_BSTATS_LAT_BINS ? ms
                                                                      : SPK_BSTATS_LAT_BINS - 1],
                              1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->st->lat_sum_ms, ms, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->st->count, 1, memory_order_relaxed);
    *handled = 1;
    return 0;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "bench-sink",
    .version = "1.0.0",
    .description = "spoke-bench: counts deliveries and their latency",
    .init = init,
    .fini = fini,
    .accept_edge_payload = accept_payload,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
