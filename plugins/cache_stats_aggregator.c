/*
 * cache-stats-aggregator -- the control half of the reference example: a control plugin
 * (hubd) with the same plugin ID as the edge plugins cache-stats and pg-cache, keeping
 * every edge's cache statistics and their totals.
 *
 * It takes the payloads of its own plugin ID whose metadata says metric_type = cache_stats,
 * in one of two forms:
 *   differences (cache-stats):  {"hits": H, "misses": M, ...}       added to the sums;
 *   totals (pg-cache):          {"epoch": E, "hits": H, "misses": M, "invalidations": I,
 *                                "entries": N, "bytes": B, ...}
 *     running totals of the edge since E (when its counts began). Several workers send
 *     them, so they may arrive out of order: the largest seen in an epoch counts, and the
 *     sums grow by the difference. entries and bytes are gauges: the last sent wins. A
 *     new epoch (the edge's store was made anew) starts from zero again, on top of what
 *     the earlier epochs counted.
 * and keeps, in its KV namespace (JSON text, readable with `hubd kv scan`):
 *
 *     edge/<edge ID>   {"hits", "misses", "invalidations", "entries", "bytes", "reports",
 *                       "last_report_ms", "epoch", "epoch_hits", "epoch_misses",
 *                       "epoch_invalidations", "last_seq"}
 *     totals           {"edges": E, "hits": H, "misses": M, "hit_rate": R,
 *                       "invalidations": I}
 *
 * hubd runs it inside the batch's transaction, so the sums change exactly once per report
 * whatever crashes (docs/control-plane.md). Anything else -- another plugin's payload, or
 * one of its own without that metadata -- is not its own: it answers handled = 0, and hubd
 * offers it to the next control plugin. A report that does not parse is handled with an
 * error (logged by hubd with its edge and correlation ID; never redelivered).
 *
 * Read the totals with `hubd kv get <plugin ID> totals -c hub.yaml`.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct agg {
    spoke_ctx *ctx;
    uint32_t id;
} agg;

static agg state;

/* One edge's record (see the top comment). */
typedef struct edge_rec {
    uint64_t hits, misses, invalidations, entries, bytes, reports, last_report_ms;
    uint64_t epoch, epoch_hits, epoch_misses, epoch_invalidations, last_seq;
} edge_rec;

typedef struct totals {
    uint64_t edges, hits, misses, invalidations;
} totals;

static const char *meta(const spoke_edge_payload *p, const char *key)
{
    for (size_t i = 0; i < p->n_metadata; i++)
        if (strcmp(p->metadata[i].key, key) == 0)
            return p->metadata[i].value;
    return NULL;
}

/* The unsigned integer after "name": in a small flat JSON object; -1 when absent. */
static int json_uint(const uint8_t *text, size_t len, const char *name, uint64_t *out)
{
    char key[32];
    int kl = snprintf(key, sizeof(key), "\"%s\"", name);
    for (size_t i = 0; i + (size_t)kl <= len; i++) {
        if (memcmp(text + i, key, (size_t)kl) != 0)
            continue;
        size_t j = i + (size_t)kl;
        while (j < len && (text[j] == ' ' || text[j] == ':'))
            j++;
        if (j >= len || text[j] < '0' || text[j] > '9')
            return -1;
        uint64_t v = 0;
        while (j < len && text[j] >= '0' && text[j] <= '9')
            v = v * 10 + (uint64_t)(text[j++] - '0');
        *out = v;
        return 0;
    }
    return -1;
}

/* totals as the JSON it is stored as, parsed back. */
static void totals_read(totals *t)
{
    const void *v;
    size_t n;
    memset(t, 0, sizeof(*t));
    if (host->kv_get(state.ctx, "totals", 6, &v, &n) != 0)
        return;
    json_uint(v, n, "edges", &t->edges);
    json_uint(v, n, "hits", &t->hits);
    json_uint(v, n, "misses", &t->misses);
    json_uint(v, n, "invalidations", &t->invalidations);
}

static int totals_write(const totals *t)
{
    char json[200];
    uint64_t all = t->hits + t->misses;
    int n = snprintf(json, sizeof(json),
                     "{\"edges\": %" PRIu64 ", \"hits\": %" PRIu64 ", \"misses\": %" PRIu64
                     ", \"hit_rate\": %.4f, \"invalidations\": %" PRIu64 "}",
                     t->edges, t->hits, t->misses, all ? (double)t->hits / (double)all : 0.0,
                     t->invalidations);
    return host->kv_put(state.ctx, "totals", 6, json, (size_t)n);
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    if (!SPOKE_HOST_HAS(host, kv_put) || !SPOKE_HOST_HAS(host, kv_get))
        return SPOKE_ERR_UNSUPPORTED;
    if (args->plugin_id == 0) {
        host->log(ctx, SPOKE_LOG_ERROR,
                  "needs an `id:` (the ID of the edge plugin, cache-stats or pg-cache)");
        return SPOKE_ERR_INVALID;
    }
    state.ctx = ctx;
    state.id = args->plugin_id;
    *self = &state;
    return 0;
}

/* clang-format off */
#define EDGE_FIELDS(X)                                                                     \
    X(hits) X(misses) X(invalidations) X(entries) X(bytes) X(reports) X(last_report_ms)    \
    X(epoch) X(epoch_hits) X(epoch_misses) X(epoch_invalidations) X(last_seq)
/* clang-format on */

static void edge_read(const void *v, size_t n, edge_rec *e)
{
#define READ(f) json_uint(v, n, #f, &e->f);
    EDGE_FIELDS(READ)
#undef READ
}

static int edge_write(const char *key, size_t klen, const edge_rec *e)
{
    char json[800];
    size_t o = 0;
#define WRITE(f)                                                                                   \
    o += (size_t)snprintf(json + o, sizeof(json) - o, "%s\"" #f "\": %" PRIu64,                    \
                          o == 0 ? "{" : ", ", e->f);
    EDGE_FIELDS(WRITE)
#undef WRITE
    o += (size_t)snprintf(json + o, sizeof(json) - o, "}");
    return host->kv_put(state.ctx, key, klen, json, o);
}

/* A running total of this epoch: the part of `now` not yet counted. */
static uint64_t advance(uint64_t *seen, uint64_t now)
{
    if (now <= *seen)
        return 0;
    uint64_t d = now - *seen;
    *seen = now;
    return d;
}

static int accept_payload(void *self, const spoke_edge_payload *p, int *handled)
{
    agg *a = self;
    const char *mt = meta(p, "metric_type");
    if (p->plugin_id != a->id || mt == NULL || strcmp(mt, "cache_stats") != 0) {
        *handled = 0;
        return 0;
    }
    *handled = 1;
    const uint8_t *body = p->payload;
    size_t blen = p->payload_len;
    uint64_t hits, misses, inval = 0, epoch = 0;
    if (json_uint(body, blen, "hits", &hits) != 0 || json_uint(body, blen, "misses", &misses) != 0)
        return SPOKE_ERR_INVALID;
    json_uint(body, blen, "invalidations", &inval);
    int running = json_uint(body, blen, "epoch", &epoch) == 0;

    char key[300];
    int kl = snprintf(key, sizeof(key), "edge/%s", p->edge_id);
    edge_rec e = {0};
    const void *v;
    size_t n;
    int rc = host->kv_get(a->ctx, key, (size_t)kl, &v, &n);
    bool new_edge = rc != 0;
    if (rc == 0)
        edge_read(v, n, &e);
    uint64_t dh = hits, dm = misses, di = inval;
    if (running) {
        if (e.epoch != epoch) { /* a new series of totals */
            e.epoch = epoch;
            e.epoch_hits = e.epoch_misses = e.epoch_invalidations = e.last_seq = 0;
        }
        dh = advance(&e.epoch_hits, hits);
        dm = advance(&e.epoch_misses, misses);
        di = advance(&e.epoch_invalidations, inval);
        if (p->sequence >= e.last_seq) {
            json_uint(body, blen, "entries", &e.entries);
            json_uint(body, blen, "bytes", &e.bytes);
            e.last_seq = p->sequence;
        }
    }
    e.hits += dh;
    e.misses += dm;
    e.invalidations += di;
    e.reports++;
    e.last_report_ms = (uint64_t)p->received_timestamp_ms;
    if ((rc = edge_write(key, (size_t)kl, &e)) != 0)
        return rc;
    totals t;
    totals_read(&t);
    t.edges += new_edge;
    t.hits += dh;
    t.misses += dm;
    t.invalidations += di;
    return totals_write(&t);
}

static const spoke_plugin cache_stats_aggregator_plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "cache-stats-aggregator",
    .version = "1.1.0",
    .description =
        "keeps every edge's cache-stats/pg-cache reports and their totals in KV (control)",
    .init = init,
    .accept_edge_payload = accept_payload,
};

SPOKE_PLUGIN_ENTRY(cache_stats_aggregator_plugin, host)
