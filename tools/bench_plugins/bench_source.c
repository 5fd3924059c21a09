/*
 * bench_source -- edge plugin "bench-source" for spoke-bench uplink: sends payloads to
 * the control plugin with its ID from a timer, at a given rate, while spoke-bench says go.
 *
 * Config: `stats: PATH` (the shared counters of bench_stats.h; required), `rate: N`
 * payloads per second from this plugin instance (0, the default: as fast as the queue takes
 * them, at most `burst` per tick), `size: BYTES` of each payload (default 256), `tick`
 * (default 1ms) and `burst` (default 2000). On each tick, while stats->go is set, it sends
 * what the rate says is due since go was set (a late tick catches up, up to `burst`);
 * send_to_control's answers are counted: accepted, queue full (the queue is the limit),
 * other errors. The edge stamps each payload's edge_timestamp_ms when it is committed.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_stats.h"
#include "spoke.h"

static const spoke_host *host;

typedef struct source {
    spoke_ctx *ctx;
    spk_bstats *st;
    uint64_t rate, burst;
    size_t size;
    uint8_t *payload;
    bool going;
    uint64_t t0_ns, sent;   /* since go was last set */
} source;

static source state;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t config_uint(spoke_ctx *ctx, const char *key, uint64_t def)
{
    uint64_t v = def;
    if (SPOKE_HOST_HAS(host, config_get_size) && host->config_get_size(ctx, key, &v) == 0)
        return v;
    const char *s = host->config_get(ctx, key);
    return s != NULL ? strtoull(s, NULL, 10) : def;
}

static void on_tick(void *self, void *arg)
{
    (void)arg;
    source *s = self;
    if (atomic_load_explicit(&s->st->go, memory_order_relaxed) == 0) {
        s->going = false;
        return;
    }
    uint64_t now = mono_ns();
    if (!s->going) {
        s->going = true;
        s->t0_ns = now;
        s->sent = 0;
    }
    uint64_t n = s->burst;
    if (s->rate != 0) {
        uint64_t due = (uint64_t)((double)(now - s->t0_ns) * 1e-9 * (double)s->rate) + 1;
        n = due > s->sent ? due - s->sent : 0;
        if (n > s->burst) {
            s->sent += n - s->burst; /* behind by more than a burst: that part is dropped */
            n = s->burst;
        }
    }
    uint64_t ok = 0, full = 0, err = 0;
    for (uint64_t i = 0; i < n; i++) {
        int rc = host->send_to_control(s->ctx, s->payload, s->size, NULL, NULL, 0, NULL);
        if (rc == 0) {
            ok++;
        } else if (rc == SPOKE_ERR_QUEUE_FULL) {
            full++;
            break; /* the queue takes no more this tick */
        } else {
            err++;
            break;
        }
    }
    s->sent += ok;
    if (s->rate != 0)
        s->sent += full + err; /* a refused payload is not retried: keep the schedule */
    atomic_fetch_add_explicit(&s->st->count, ok, memory_order_relaxed);
    if (full)
        atomic_fetch_add_explicit(&s->st->queue_full, full, memory_order_relaxed);
    if (err)
        atomic_fetch_add_explicit(&s->st->errors, err, memory_order_relaxed);
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    source *s = &state;
    memset(s, 0, sizeof(*s));
    s->ctx = ctx;
    const char *path = host->config_get(ctx, "stats");
    if (path == NULL || !SPOKE_HOST_HAS(host, send_to_control)) {
        host->log(ctx, SPOKE_LOG_ERROR, "config.stats is required (and send_to_control)");
        return SPOKE_ERR_INVALID;
    }
    s->rate = config_uint(ctx, "rate", 0);
    s->burst = config_uint(ctx, "burst", 2000);
    s->size = (size_t)config_uint(ctx, "size", 256);
    uint64_t tick_ms = 1;
    if (SPOKE_HOST_HAS(host, config_get_duration))
        host->config_get_duration(ctx, "tick", &tick_ms);
    if (s->burst == 0 || s->size == 0 || s->size > (1u << 20) || tick_ms == 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "burst, size (<= 1MiB) and tick must be > 0");
        return SPOKE_ERR_INVALID;
    }
    s->payload = malloc(s->size);
    s->st = spk_bstats_map(path);
    if (s->payload == NULL || s->st == NULL) {
        free(s->payload);
        spk_bstats_unmap(s->st);
        host->log(ctx, SPOKE_LOG_ERROR, "cannot map %s", path);
        return SPOKE_ERR_INVALID;
    }
    for (size_t i = 0; i < s->size; i++)
        s->payload[i] = (uint8_t)('a' + i % 26);
    if (host->every(ctx, tick_ms, on_tick, NULL) < 0) {
        free(s->payload);
        spk_bstats_unmap(s->st);
        return SPOKE_ERR_UNSUPPORTED;
    }
    atomic_fetch_add_explicit(&s->st->instances, 1, memory_order_relaxed);
    *self = s;
    return 0;
}

static void fini(void *self)
{
    source *s = self;
    free(s->payload);
    spk_bstats_unmap(s->st);
    s->payload = NULL;
    s->st = NULL;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "bench-source",
    .version = "1.0.0",
    .description = "spoke-bench: sends payloads at a rate from a timer",
    .init = init,
    .fini = fini,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
