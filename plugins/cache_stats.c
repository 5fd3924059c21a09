/*
 * cache-stats -- the edge half of the reference example (Tyk's edge-to-control channel):
 * counts the hits and misses of a toy cache and reports them to the control plane, where
 * cache-stats-aggregator (plugins/cache_stats_aggregator.c, the same plugin ID) sums them
 * per edge.
 *
 * The toy cache is keyed by the request line: the first line of each chunk a client sends
 * (up to 1 KiB, without its CR LF). A line seen before in this worker is a hit, a new one a
 * miss (and is remembered). It never changes traffic. Every `report_interval` it sends the
 * counts since its last report, if any, with send_to_control_json:
 *
 *     {"hits": 12, "misses": 3, "entries": 3}      metadata: metric_type = cache_stats
 *
 * Reports carry differences, not running totals, so the aggregator's sum is exact however
 * many workers report and however often they restart: the queue and hubd deliver each
 * report exactly once. A report the queue refuses (full, unavailable) is kept and its
 * counts go out with the next one; fini sends what is left.
 *
 * Config:
 *   report_interval  a duration (default 10s; 1ms..24h)
 *   max_entries      request lines remembered per worker (default 10000, 1..10000000);
 *                    when full, the cache is emptied (it is a toy)
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

#define DEFAULT_INTERVAL_MS 10000u
#define MAX_INTERVAL_MS (24u * 3600u * 1000u)
#define DEFAULT_MAX_ENTRIES 10000u
#define MAX_MAX_ENTRIES 10000000u
#define MAX_LINE 1024u

static const spoke_host *host;

typedef struct stats {
    spoke_ctx *ctx;
    uint64_t *slots;      /* open addressing: 64-bit line hashes, 0 = empty */
    size_t cap;           /* a power of two, at least twice max_entries */
    size_t entries, max_entries;
    uint64_t hits, misses;          /* not yet reported */
    uint64_t total_hits, total_misses;
} stats;

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h != 0 ? h : 1; /* 0 marks an empty slot */
}

/* Whether the line was there; inserts it when not. */
static int lookup_insert(stats *s, uint64_t h)
{
    size_t mask = s->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        if (s->slots[i] == h)
            return 1;
        if (s->slots[i] == 0) {
            if (s->entries >= s->max_entries) {
                memset(s->slots, 0, s->cap * sizeof(*s->slots));
                s->entries = 0;
                i = h & mask;
            }
            s->slots[i] = h;
            s->entries++;
            return 0;
        }
    }
}

static void report(stats *s, const char *why)
{
    if (s->hits == 0 && s->misses == 0)
        return;
    char json[160];
    int n = snprintf(json, sizeof(json), "{\"hits\": %" PRIu64 ", \"misses\": %" PRIu64
                     ", \"entries\": %zu}", s->hits, s->misses, s->entries);
    static const spoke_kv md[] = {{"metric_type", "cache_stats"}};
    uint64_t pending = 0;
    int rc = host->send_to_control_json(s->ctx, json, (size_t)n, NULL, md, 1, &pending);
    if (rc != 0) {
        host->log(s->ctx, SPOKE_LOG_WARN, "%s report not queued (%s); its counts go with the "
                  "next one", why, host->strerror(rc));
        return;
    }
    s->hits = s->misses = 0;
}

static void on_timer(void *self, void *arg)
{
    (void)arg;
    report(self, "periodic");
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    if (!SPOKE_HOST_HAS(host, send_to_control_json) || !SPOKE_HOST_HAS(host, config_get_size))
        return SPOKE_ERR_UNSUPPORTED; /* a control-role host, or one older than 1.1 */
    uint64_t ms = DEFAULT_INTERVAL_MS, max = DEFAULT_MAX_ENTRIES;
    if (host->config_get_duration(ctx, "report_interval", &ms) != 0 || ms == 0 ||
        ms > MAX_INTERVAL_MS) {
        host->log(ctx, SPOKE_LOG_ERROR, "report_interval: '%s' is not a duration between 1ms "
                  "and 24h", host->config_get(ctx, "report_interval"));
        return SPOKE_ERR_INVALID;
    }
    const char *mx = host->config_get(ctx, "max_entries");
    if (mx != NULL) {
        char *end;
        max = strtoull(mx, &end, 10);
        if (*end != '\0' || max == 0 || max > MAX_MAX_ENTRIES) {
            host->log(ctx, SPOKE_LOG_ERROR, "max_entries: '%s' is not a number between 1 and "
                      "10000000", mx);
            return SPOKE_ERR_INVALID;
        }
    }
    stats *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return SPOKE_ERR_NOMEM;
    s->ctx = ctx;
    s->max_entries = (size_t)max;
    for (s->cap = 16; s->cap < 2 * s->max_entries; s->cap *= 2)
        ;
    if ((s->slots = calloc(s->cap, sizeof(*s->slots))) == NULL) {
        free(s);
        return SPOKE_ERR_NOMEM;
    }
    int64_t id = host->every(ctx, ms, on_timer, NULL);
    if (id < 0) {
        free(s->slots);
        free(s);
        return (int)id;
    }
    *self = s;
    return 0;
}

static void fini(void *self)
{
    stats *s = self;
    report(s, "final");
    host->log(s->ctx, SPOKE_LOG_INFO, "hits=%" PRIu64 " misses=%" PRIu64 " (this worker, "
              "since it started)", s->total_hits, s->total_misses);
    free(s->slots);
    free(s);
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    stats *s = self;
    (void)conn;
    const uint8_t *nl = memchr(buf->data, '\n', buf->len < MAX_LINE ? buf->len : MAX_LINE);
    size_t n = nl != NULL ? (size_t)(nl - buf->data) : (buf->len < MAX_LINE ? buf->len : MAX_LINE);
    if (n > 0 && buf->data[n - 1] == '\r')
        n--;
    if (n == 0)
        return SPOKE_CONTINUE;
    if (lookup_insert(s, fnv1a(buf->data, n))) {
        s->hits++;
        s->total_hits++;
    } else {
        s->misses++;
        s->total_misses++;
    }
    return SPOKE_CONTINUE;
}

static const spoke_plugin cache_stats_plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "cache-stats",
    .version = "1.0.0",
    .description = "counts toy-cache hits and misses by request line, reports them to control",
    .init = init,
    .fini = fini,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(cache_stats_plugin, host)
