/*
 * hub.c -- a hubd worker (the contract is in hub.h).
 *
 * Calls arrive from the gRPC server's handler (on_call). Health checks are answered at
 * once; EdgeControl calls are authenticated, decoded and put on `pending`. An ev_prepare
 * watcher, which libev runs once the loop turn's callbacks are done and before it blocks
 * again, commits what the turn brought (on_group): one write transaction for every
 * pending call, its commit (one flush), then the answers. (An ev_check watcher would run
 * only after the loop's next wake-up: a lone batch waited for the 100 ms timer.) A batch's per-payload work is deliver_payload():
 * validate, mark, route, each plugin call stamped in the worker's slot so that a crash or
 * hang in accept_edge_payload is blamed on its plugin like any other hook.
 */
#include "hub.h"

#include <ev.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chain.h"
#include "grpc.h"
#include "grpc_server.h"
#include "host.h"
#include "hub_auth.h"
#include "json.h"
#include "kv.h"
#include "kv_conf.h"
#include "loader.h"
#include "log.h"
#include "queue.h"
#include "grpc/health/v1/health.pb-c.h"
#include "spoke/control/v1/control.pb-c.h"

#define P_BATCH "/spoke.control.v1.EdgeControl/SendPluginControlBatch"
#define P_HEARTBEAT "/spoke.control.v1.EdgeControl/Heartbeat"
#define P_HEALTH "/grpc.health.v1.Health/Check"
#define EXPIRE_PERIOD_S 60.0

typedef Spoke__Control__V1__SendPluginControlBatchRequest batch_req;
typedef Spoke__Control__V1__HeartbeatRequest beat_req;

/* A call waiting for the group commit. */
typedef struct pending {
    struct pending *next;
    spk_grpc_call *call;
    batch_req *batch;      /* one of the two */
    beat_req *beat;
    const uint8_t *beat_raw; /* the heartbeat's encoded bytes (borrowed from the call) */
    size_t beat_len;
    Spoke__Control__V1__SendPluginControlBatchResponse resp;
    Spoke__Control__V1__PayloadResult *results;
    Spoke__Control__V1__PayloadResult **result_ptrs;
} pending;

typedef struct hub {
    struct ev_loop *loop;
    spk_config *cfg;
    const spk_hub_opts *opts;
    spk_plugin_set set;
    spk_chain chain;          /* for on_tick */
    spk_host_env env;
    spk_slot *slot;
    spk_slot private_slot;
    unsigned *health_fails;
    spk_kv *kv;
    spk_hub_tokens *tokens;
    SSL_CTX *tls;
    spk_grpc_server *srv;
    pending *pending, **pending_tail;
    size_t n_pending;
    ev_prepare group;
    ev_signal sig_term, sig_int, sig_quit, sig_go;
    ev_timer tick, heartbeat, health, expire, drain_check, drain_deadline;
    bool accepting, draining;
    int result;
} hub;

static int64_t unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

size_t spk_hub_edge_key(const char *edge_id, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "edge/%s", edge_id);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* ---- the edge registry ---------------------------------------------------------------- */

/* Read-modify-write edge `id`'s entry in transaction t: `fn` updates the header; a new
 * heartbeat's bytes replace the stored ones when beat != NULL. */
static int edge_update(spk_kv_txn *t, const char *id, const spk_hub_edge_rec *add,
                       const uint8_t *beat, size_t beat_len, int64_t now_ms, spk_errbuf *eb)
{
    char key[300];
    size_t klen = spk_hub_edge_key(id, key, sizeof(key));
    const void *old = NULL;
    size_t olen = 0;
    spk_hub_edge_rec r = {0};
    int rc = spk_kv_get(t, 0, key, klen, &old, &olen, eb);
    if (rc == 0 && olen >= sizeof(r))
        memcpy(&r, old, sizeof(r));
    else if (rc != 0 && rc != SPK_ENOENT)
        return rc;
    const uint8_t *tail = rc == 0 && olen > sizeof(r) ? (const uint8_t *)old + sizeof(r) : NULL;
    size_t tlen = tail != NULL ? olen - sizeof(r) : 0;
    if (beat != NULL) {
        tail = beat;
        tlen = beat_len;
        r.last_heartbeat_ms = now_ms;
    }
    if (add != NULL) {
        r.last_batch_ms = now_ms;
        r.batches += add->batches;
        r.payloads += add->payloads;
        r.duplicates += add->duplicates;
        r.no_receiver += add->no_receiver;
        r.refused += add->refused;
    }
    uint8_t *v = malloc(sizeof(r) + tlen);
    if (v == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    memcpy(v, &r, sizeof(r));
    if (tlen > 0)
        memcpy(v + sizeof(r), tail, tlen); /* copy before the put: tail may point into LMDB */
    rc = spk_kv_put(t, 0, key, klen, v, sizeof(r) + tlen, eb);
    free(v);
    return rc;
}

/* ---- delivering one payload ------------------------------------------------------------ */

static spk_plugin *plugin_by_id(hub *h, uint32_t id)
{
    for (size_t i = 0; i < h->set.n; i++)
        if (h->set.v[i]->id == id && h->set.v[i]->table.accept_edge_payload != NULL)
            return h->set.v[i];
    return NULL;
}

/* Call plugin p's accept_edge_payload, stamped. Returns its return value. */
static int call_accept(hub *h, spk_plugin *p, const spoke_edge_payload *ep, int *handled)
{
    *handled = 0;
    uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, h->slot, SPK_HOOK_ACCEPT);
    int rc = p->table.accept_edge_payload(p->self, ep, handled);
    SPK_PLUGIN_HOOK_END(p, h->slot, SPK_HOOK_ACCEPT, t);
    if (rc < 0)
        spk_plugin_hook_error(p, SPK_HOOK_ACCEPT);
    return rc;
}

static void refuse(Spoke__Control__V1__PayloadResult *r, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void refuse(Spoke__Control__V1__PayloadResult *r, const char *code, const char *fmt, ...)
{
    char reason[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    r->outcome = SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__REFUSED;
    r->code = (char *)code;
    r->reason = strdup(reason); /* freed with the pending entry */
    if (r->reason == NULL)
        r->reason = (char *)protobuf_c_empty_string;
}

/* The limits of the edge (queue.h's spk_queue_validate, one rule for both ends) and the
 * host's UTF-8 policy (hub.h). */
int spk_hub_payload_validate(const Spoke__Control__V1__EdgePayload *p, spoke_kv *md,
                             Spoke__Control__V1__PayloadResult *r)
{
    if (p->plugin_id == 0) {
        refuse(r, "malformed", "plugin_id 0 names no plugin");
        return -1;
    }
    if (p->n_metadata > SPOKE_MAX_METADATA) {
        refuse(r, "too_many_metadata", "%zu metadata entries (limit %u)", p->n_metadata,
               SPOKE_MAX_METADATA);
        return -1;
    }
    for (size_t i = 0; i < p->n_metadata; i++) {
        md[i].key = p->metadata[i]->key;
        md[i].value = p->metadata[i]->value;
    }
    spk_queue_msg m = {.plugin_id = p->plugin_id, .edge_id = p->edge_id,
                       .payload = p->payload.data, .payload_len = p->payload.len,
                       .correlation_id = p->correlation_id, .metadata = md,
                       .n_metadata = p->n_metadata, .content_type = p->content_type,
                       .edge_timestamp_ms = p->edge_timestamp_ms};
    spk_errbuf eb;
    int rc = spk_queue_validate(&m, &eb);
    if (rc != 0) {
        refuse(r, spk_qrefuse_name(rc == SPK_EPAYLOAD_TOO_LARGE   ? SPK_QR_PAYLOAD_TOO_LARGE
                                   : rc == SPK_ETOO_MANY_METADATA ? SPK_QR_TOO_MANY_METADATA
                                   : rc == SPK_EMETADATA_KEY      ? SPK_QR_METADATA_KEY
                                   : rc == SPK_EMETADATA_VALUE    ? SPK_QR_METADATA_VALUE
                                   : rc == SPK_ECORRELATION_ID    ? SPK_QR_CORRELATION_ID
                                                                  : SPK_QR_INVALID),
               "%s", eb.msg);
        return -1;
    }
    const char *strs[] = {p->correlation_id, p->content_type, p->edge_id};
    for (size_t i = 0; i < 3; i++) {
        if (strs[i] != NULL && !spk_utf8_valid(strs[i], strlen(strs[i]))) {
            refuse(r, "invalid", "a string field is not UTF-8");
            return -1;
        }
    }
    for (size_t i = 0; i < p->n_metadata; i++) {
        if (!spk_utf8_valid(md[i].key, strlen(md[i].key)) ||
            !spk_utf8_valid(md[i].value, strlen(md[i].value))) {
            refuse(r, "invalid", "metadata entry %zu is not UTF-8", i);
            return -1;
        }
    }
    return 0;
}

/* Count payload outcome `o` for plugin ID `id` in the worker's slot. */
static void count_outcome(hub *h, uint32_t id, enum spk_hub_outcome o)
{
    if (h->opts->wslot == NULL)
        return;
    _Atomic uint64_t *v = spk_hub_by_plugin_of(&h->opts->wslot->hub.by_plugin, id);
    atomic_store_explicit(&v[o], atomic_load_explicit(&v[o], memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* One payload of a batch from `edge` (authenticated), inside the group's transaction. */
static int deliver_payload(hub *h, spk_kv_txn *t, const batch_req *b,
                           const Spoke__Control__V1__EdgePayload *p, int64_t now_ms,
                           Spoke__Control__V1__PayloadResult *r, spk_hub_edge_rec *tally,
                           spk_errbuf *eb)
{
    spoke_kv md[SPOKE_MAX_METADATA];
    r->sequence = p->sequence;
    const char *edge = p->edge_id != NULL && p->edge_id[0] != '\0' ? p->edge_id : b->edge_id;
    if (h->tokens != NULL || h->cfg->tls_client_ca != NULL) {
        if (strcmp(edge, b->edge_id) != 0) {
            refuse(r, "edge_mismatch", "payload of edge '%.100s' in a batch of '%.100s'", edge,
                   b->edge_id);
            tally->refused++;
            count_outcome(h, p->plugin_id, SPK_HO_REFUSED);
            return 0;
        }
    }
    if (spk_hub_payload_validate(p, md, r) != 0) {
        tally->refused++;
        count_outcome(h, p->plugin_id, SPK_HO_REFUSED);
        return 0;
    }
    spk_plugin *target = plugin_by_id(h, p->plugin_id);
    if (target == NULL) {
        r->outcome = SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__NO_RECEIVER;
        tally->no_receiver++;
        count_outcome(h, p->plugin_id, SPK_HO_NO_RECEIVER);
        return 0;
    }
    bool dup = false;
    int rc = spk_kv_dedupe_mark(t, edge, p->sequence, now_ms, &dup, eb);
    if (rc != 0)
        return rc;
    if (dup) {
        r->outcome = SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__DUPLICATE;
        tally->duplicates++;
        count_outcome(h, p->plugin_id, SPK_HO_DUPLICATE);
        return 0;
    }
    spoke_edge_payload ep = {
        .struct_size = sizeof(ep), .plugin_id = p->plugin_id, .payload = p->payload.data,
        .payload_len = p->payload.len, .edge_id = edge, .edge_namespace = b->edge_namespace,
        .correlation_id = p->correlation_id, .content_type = p->content_type,
        .metadata = md, .n_metadata = p->n_metadata,
        .edge_timestamp_ms = p->edge_timestamp_ms, .received_timestamp_ms = now_ms,
        .sequence = p->sequence,
    };
    /* The target first, then the others in config order while none handled it; each in a
     * nested transaction that holds its KV writes. */
    int handled = 0;
    for (size_t i = 0; i <= h->set.n && !handled; i++) {
        spk_plugin *pl = i == 0 ? target : h->set.v[i - 1];
        if (i > 0 && (pl == target || pl->table.accept_edge_payload == NULL))
            continue;
        spk_kv_txn *child;
        if ((rc = spk_kv_begin(h->kv, t, true, &child, eb)) != 0)
            return rc;
        h->env.kv_txn = child;
        int prc = call_accept(h, pl, &ep, &handled);
        h->env.kv_txn = NULL;
        if (prc != 0) {
            /* Handled with an error: logged, counted, never retried; its writes are
             * dropped with its nested transaction. */
            spk_kv_abort(child);
            spk_error("plugin %s: accept_edge_payload failed (%d, %s) for edge %s sequence "
                      "%llu correlation '%s'", pl->name, prc, spk_strerror(prc), edge,
                      (unsigned long long)p->sequence, p->correlation_id);
            if (h->opts->wslot != NULL)
                atomic_fetch_add_explicit(&h->opts->wslot->hub.plugin_errors, 1,
                                          memory_order_relaxed);
            count_outcome(h, p->plugin_id, SPK_HO_ERROR);
            handled = 1;
        } else if ((rc = spk_kv_commit(child, eb)) != 0) {
            return rc; /* into the parent: only fails when the map is full */
        }
    }
    r->outcome = SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__ACCEPTED;
    tally->payloads++;
    count_outcome(h, p->plugin_id, SPK_HO_ACCEPTED);
    return 0;
}

/* ---- the group commit ------------------------------------------------------------------ */

static void pending_free(pending *pe)
{
    for (size_t i = 0; pe->results != NULL && i < pe->resp.n_results; i++)
        free(pe->results[i].reason == protobuf_c_empty_string ? NULL : pe->results[i].reason);
    free(pe->results);
    free(pe->result_ptrs);
    if (pe->batch != NULL)
        spoke__control__v1__send_plugin_control_batch_request__free_unpacked(pe->batch, NULL);
    if (pe->beat != NULL)
        spoke__control__v1__heartbeat_request__free_unpacked(pe->beat, NULL);
    free(pe);
}

/* Run one batch's payloads in transaction t. */
static int run_batch(hub *h, spk_kv_txn *t, pending *pe, int64_t now_ms, spk_errbuf *eb)
{
    batch_req *b = pe->batch;
    size_t n = b->n_payloads;
    pe->results = calloc(n ? n : 1, sizeof(*pe->results));
    pe->result_ptrs = calloc(n ? n : 1, sizeof(*pe->result_ptrs));
    if (pe->results == NULL || pe->result_ptrs == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    spoke__control__v1__send_plugin_control_batch_response__init(&pe->resp);
    pe->resp.results = pe->result_ptrs;
    pe->resp.hub_time_ms = now_ms;
    spk_hub_edge_rec tally = {.batches = 1};
    for (size_t i = 0; i < n; i++) {
        Spoke__Control__V1__PayloadResult *r = &pe->results[i];
        spoke__control__v1__payload_result__init(r);
        pe->result_ptrs[i] = r;
        pe->resp.n_results = i + 1;
        int rc = deliver_payload(h, t, b, b->payloads[i], now_ms, r, &tally, eb);
        if (rc != 0)
            return rc;
        if (r->outcome == SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__ACCEPTED ||
            r->outcome == SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__DUPLICATE)
            pe->resp.accepted++;
    }
    if (h->opts->wslot != NULL) {
        spk_hub_counters *hc = &h->opts->wslot->hub;
        atomic_fetch_add_explicit(&hc->batches, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&hc->accepted, tally.payloads, memory_order_relaxed);
        atomic_fetch_add_explicit(&hc->duplicates, tally.duplicates, memory_order_relaxed);
        atomic_fetch_add_explicit(&hc->no_receiver, tally.no_receiver, memory_order_relaxed);
        atomic_fetch_add_explicit(&hc->refused, tally.refused, memory_order_relaxed);
    }
    return edge_update(t, b->edge_id, &tally, NULL, 0, now_ms, eb);
}

static void answer(hub *h, pending *pe)
{
    (void)h;
    if (pe->batch != NULL) {
        size_t len = spoke__control__v1__send_plugin_control_batch_response__get_packed_size(&pe->resp);
        uint8_t *buf = malloc(len ? len : 1);
        if (buf == NULL) {
            spk_grpc_call_fail(pe->call, SPK_GRPC_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        spoke__control__v1__send_plugin_control_batch_response__pack(&pe->resp, buf);
        spk_grpc_call_respond(pe->call, buf, len);
        free(buf);
        return;
    }
    Spoke__Control__V1__HeartbeatResponse r = SPOKE__CONTROL__V1__HEARTBEAT_RESPONSE__INIT;
    r.hub_time_ms = unix_ms();
    r.heartbeat_interval_ms = h->cfg->hub_heartbeat_ms;
    r.batch_size = h->cfg->hub_batch_size;
    uint8_t buf[64];
    size_t len = spoke__control__v1__heartbeat_response__pack(&r, buf);
    spk_grpc_call_respond(pe->call, buf, len);
}

static void on_group(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)revents;
    hub *h = w->data;
    ev_prepare_stop(loop, w);
    pending *list = h->pending;
    h->pending = NULL;
    h->pending_tail = &h->pending;
    h->n_pending = 0;
    if (list == NULL)
        return;
    spk_errbuf eb = {""};
    int64_t now_ms = unix_ms();
    spk_kv_txn *t = NULL;
    int rc = spk_kv_begin(h->kv, NULL, true, &t, &eb);
    for (pending *pe = list; pe != NULL && rc == 0; pe = pe->next) {
        if (pe->batch != NULL)
            rc = run_batch(h, t, pe, now_ms, &eb);
        else
            rc = edge_update(t, pe->beat->edge_id, NULL, pe->beat_raw, pe->beat_len, now_ms, &eb);
    }
    if (rc == 0)
        rc = spk_kv_commit(t, &eb); /* one flush for every batch of this turn */
    else if (t != NULL)
        spk_kv_abort(t);
    if (rc != 0)
        spk_error("group commit of %s failed: %s; the edges will resend", "the batches", eb.msg);
    while (list != NULL) {
        pending *pe = list;
        list = pe->next;
        if (rc == 0)
            answer(h, pe);
        else
            spk_grpc_call_fail(pe->call, SPK_GRPC_UNAVAILABLE, "hub store: %s", eb.msg);
        pending_free(pe);
    }
}

/* ---- calls ---------------------------------------------------------------------------- */

static void count_auth_failure(hub *h)
{
    if (h->opts->wslot != NULL)
        atomic_fetch_add_explicit(&h->opts->wslot->hub.auth_failures, 1, memory_order_relaxed);
}

static bool authenticate(hub *h, spk_grpc_call *call, const char *edge_id)
{
    size_t n = 0;
    const char *const *names = spk_grpc_call_tls_names(call, &n);
    spk_hub_identity id;
    if (spk_hub_auth_check(h->tokens, h->cfg->tls_client_ca != NULL, edge_id,
                           spk_grpc_call_header(call, "authorization"), names, n, &id) == 0)
        return true;
    count_auth_failure(h);
    spk_warn("refused a call from %s for edge '%.100s': %s", spk_grpc_call_peer(call),
             edge_id != NULL ? edge_id : "", id.reason);
    spk_grpc_call_fail(call, id.status, "%s", id.reason);
    return false;
}

static void on_health_call(spk_grpc_call *call, const uint8_t *msg, size_t len)
{
    Grpc__Health__V1__HealthCheckRequest *rq =
        grpc__health__v1__health_check_request__unpack(NULL, len, msg);
    if (rq == NULL) {
        spk_grpc_call_fail(call, SPK_GRPC_INVALID_ARGUMENT, "HealthCheckRequest does not decode");
        return;
    }
    bool known = rq->service[0] == '\0' || strcmp(rq->service, "spoke.control.v1.EdgeControl") == 0;
    grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
    if (!known) {
        spk_grpc_call_fail(call, SPK_GRPC_NOT_FOUND, "unknown service");
        return;
    }
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    uint8_t buf[16];
    size_t n = grpc__health__v1__health_check_response__pack(&r, buf);
    spk_grpc_call_respond(call, buf, n);
}

static void enqueue(hub *h, pending *pe)
{
    *h->pending_tail = pe;
    h->pending_tail = &pe->next;
    h->n_pending++;
    if (!ev_is_active(&h->group))
        ev_prepare_start(h->loop, &h->group);
}

static void on_call(void *arg, spk_grpc_call *call)
{
    hub *h = arg;
    const char *path = spk_grpc_call_path(call);
    size_t len;
    const uint8_t *msg = spk_grpc_call_message(call, &len);
    if (strcmp(path, P_HEALTH) == 0) {
        on_health_call(call, msg, len);
        return;
    }
    bool is_batch = strcmp(path, P_BATCH) == 0;
    if (!is_batch && strcmp(path, P_HEARTBEAT) != 0) {
        spk_grpc_call_fail(call, SPK_GRPC_UNIMPLEMENTED, "unknown method %.200s", path);
        return;
    }
    pending *pe = calloc(1, sizeof(*pe));
    if (pe == NULL) {
        spk_grpc_call_fail(call, SPK_GRPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    pe->call = call;
    const char *edge_id;
    if (is_batch) {
        pe->batch = spoke__control__v1__send_plugin_control_batch_request__unpack(NULL, len, msg);
        edge_id = pe->batch != NULL ? pe->batch->edge_id : NULL;
    } else {
        pe->beat = spoke__control__v1__heartbeat_request__unpack(NULL, len, msg);
        pe->beat_raw = msg;
        pe->beat_len = len;
        edge_id = pe->beat != NULL ? pe->beat->edge_id : NULL;
    }
    if (pe->batch == NULL && pe->beat == NULL) {
        spk_grpc_call_fail(call, SPK_GRPC_INVALID_ARGUMENT, "%s does not decode as its message",
                           path);
        pending_free(pe);
        return;
    }
    if (edge_id == NULL || edge_id[0] == '\0' || strlen(edge_id) > SPK_KV_MAX_EDGE_ID ||
        !spk_utf8_valid(edge_id, strlen(edge_id))) {
        spk_grpc_call_fail(call, SPK_GRPC_INVALID_ARGUMENT,
                           "edge_id must be 1 to %u bytes of UTF-8", SPK_KV_MAX_EDGE_ID);
        pending_free(pe);
        return;
    }
    if (!authenticate(h, call, edge_id)) {
        pending_free(pe);
        return;
    }
    enqueue(h, pe);
}

/* ---- timers and signals ------------------------------------------------------------------- */

static void stop_now(hub *h)
{
    ev_break(h->loop, EVBREAK_ALL);
}

static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    spk_chain_tick(&h->chain);
}

static void on_heartbeat(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    spk_wslot *sl = h->opts->wslot;
    spk_grpc_server_stats st;
    spk_grpc_server_stats_get(h->srv, &st);
    atomic_store_explicit(&sl->act.heartbeat_ms, spk_mono_ms(), memory_order_relaxed);
    atomic_store_explicit(&sl->conns_active, st.connections, memory_order_relaxed);
    atomic_store_explicit(&sl->conns_total, st.accepted, memory_order_relaxed);
}

static void on_health(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    size_t failed = spk_host_health_round(&h->set, h->slot, h->health_fails,
                                          h->cfg->health_fail_limit);
    if (failed != 0) {
        if (h->opts->wslot != NULL)
            atomic_store(&h->opts->wslot->health_failed, (uint32_t)failed);
        h->result = SPK_EBUSY;
        stop_now(h);
    }
}

/* Worker 0 removes dedupe marks older than hub.dedupe_retention, in bounded transactions. */
static void on_expire(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    uint64_t removed = 0;
    spk_errbuf eb;
    int64_t cutoff = unix_ms() - (int64_t)h->cfg->hub_dedupe_retention_ms;
    if (spk_kv_dedupe_expire(h->kv, cutoff, &removed, &eb) != 0)
        spk_warn("dedupe expiry: %s", eb.msg);
    else if (removed > 0)
        spk_info("dedupe: %llu marks older than the retention removed",
                 (unsigned long long)removed);
}

static void on_drain_check(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    spk_grpc_server_stats st;
    spk_grpc_server_stats_get(h->srv, &st);
    if (st.connections == 0 && h->pending == NULL)
        stop_now(h);
}

static void on_drain_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub *h = w->data;
    spk_warn("drain_timeout reached; closing the remaining connections");
    stop_now(h);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    hub *h = w->data;
    spk_errbuf eb;
    if (w->signum == SIGUSR1) {
        if (h->accepting || h->draining)
            return;
        h->accepting = true;
        for (size_t i = 0; i < h->opts->n_listen; i++)
            if (spk_grpc_server_listen(h->srv, h->opts->listen_fds[i], &eb) != 0)
                spk_error("%s", eb.msg);
        return;
    }
    if (w->signum == SIGQUIT) {
        spk_info("SIGQUIT: stopping now");
        stop_now(h);
        return;
    }
    if (h->draining)
        return;
    h->draining = true;
    if (h->opts->wslot != NULL)
        atomic_store(&h->opts->wslot->state, SPK_W_DRAINING);
    spk_info("%s: no longer accepting; finishing the calls in flight", sigabbrev_np(w->signum));
    spk_grpc_server_shutdown(h->srv);
    ev_timer_init(&h->drain_check, on_drain_check, 0, 0.05);
    h->drain_check.data = h;
    ev_timer_again(loop, &h->drain_check);
    ev_timer_init(&h->drain_deadline, on_drain_deadline,
                  (double)h->cfg->drain_timeout_ms / 1000.0, 0);
    h->drain_deadline.data = h;
    ev_timer_start(loop, &h->drain_deadline);
}

static void watch_signal(hub *h, ev_signal *s, int signum)
{
    ev_signal_init(s, on_signal, signum);
    s->data = h;
    ev_signal_start(h->loop, s);
}

static void start_timer(hub *h, ev_timer *t, void (*cb)(struct ev_loop *, ev_timer *, int),
                        double period)
{
    ev_timer_init(t, cb, period, period);
    t->data = h;
    ev_timer_start(h->loop, t);
}

/* ---- start and stop ---------------------------------------------------------------------- */

static int start(hub *h, spk_errbuf *eb)
{
    const spk_hub_opts *opts = h->opts;
    spk_config *cfg = h->cfg;
    spk_host_env_init(&h->env, h->loop, cfg, SPOKE_ROLE_CONTROL);
    h->slot = opts->wslot ? &opts->wslot->act : &h->private_slot;
    /* The store of the dedupe marks is the plugins' KV store: one transaction holds both. */
    int rc = spk_kv_conf_open(cfg, SPOKE_ROLE_CONTROL, &h->kv, eb);
    if (rc != 0)
        return rc;
    h->env.kv = h->kv;
    if (cfg->auth_token_file != NULL &&
        (rc = spk_hub_tokens_load(cfg->auth_token_file, &h->tokens, eb)) != 0)
        return rc;
    if (cfg->tls_cert != NULL &&
        (rc = spk_grpc_tls_server_ctx(cfg->tls_cert, cfg->tls_key, cfg->tls_client_ca,
                                      cfg->tls_client_ca != NULL, &h->tls, eb)) != 0)
        return rc;
    rc = spk_plugin_set_load(cfg, spk_host_table_for(SPOKE_ROLE_CONTROL), &h->env, h->slot,
                             opts->quarantine, opts->n_quarantine, &h->set, eb);
    if (rc != 0)
        return rc;
    if (opts->wslot != NULL)
        spk_plugin_set_publish(&h->set, opts->wslot);
    spk_plugin_set_stats(&h->set, opts->wslot ? &opts->wslot->hooks : NULL,
                         cfg->metrics_hook_sample);
    h->env.pm = opts->wslot ? &opts->wslot->pm : NULL;
    h->health_fails = calloc(h->set.n ? h->set.n : 1, sizeof(unsigned));
    if (h->health_fails == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    if ((rc = spk_plugin_set_init(&h->set, SPOKE_ROLE_CONTROL, eb)) != 0)
        return rc;
    if ((rc = spk_chain_build(&h->chain, &h->set)) != 0)
        return spk_errf(eb, rc, "out of memory");
    spk_chain_set_slot(&h->chain, h->slot);
    spk_grpc_server_opts so;
    spk_grpc_server_opts_init(&so);
    so.handler = on_call;
    so.arg = h;
    so.tls = h->tls;
    so.max_message = cfg->limit_max_message;
    so.max_streams = cfg->limit_max_streams;
    so.max_header_list = cfg->limit_max_header_list;
    so.max_connections = cfg->max_connections;
    so.request_timeout_ms = cfg->limit_request_timeout_ms;
    so.idle_timeout_ms = cfg->limit_idle_timeout_ms;
    return spk_grpc_server_new(h->loop, &so, &h->srv, eb);
}

int spk_hub_worker_run(spk_config *cfg, const spk_hub_opts *opts, spk_errbuf *eb)
{
    hub h;
    memset(&h, 0, sizeof(h));
    h.cfg = cfg;
    h.opts = opts;
    h.pending_tail = &h.pending;
    h.loop = ev_default_loop(EVFLAG_AUTO);
    if (h.loop == NULL)
        return spk_errf(eb, SPK_EIO, "cannot create the event loop");
    ev_prepare_init(&h.group, on_group);
    h.group.data = &h;
    int rc = start(&h, eb);
    if (rc != 0)
        goto out;
    for (size_t i = 0; i < h.set.n; i++)
        spk_info("control plugin %s %s (ID %u) loaded from %s", h.set.v[i]->name,
                 h.set.v[i]->table.version, h.set.v[i]->id, h.set.v[i]->path);
    start_timer(&h, &h.tick, on_tick, (double)cfg->tick_ms / 1000.0);
    start_timer(&h, &h.health, on_health, (double)cfg->health_check_period_ms / 1000.0);
    if (opts->index == 0) {
        start_timer(&h, &h.expire, on_expire, EXPIRE_PERIOD_S);
        on_expire(h.loop, &h.expire, 0);
    }
    watch_signal(&h, &h.sig_term, SIGTERM);
    watch_signal(&h, &h.sig_int, SIGINT);
    watch_signal(&h, &h.sig_quit, SIGQUIT);
    watch_signal(&h, &h.sig_go, SIGUSR1);
    if (opts->wslot != NULL) {
        start_timer(&h, &h.heartbeat, on_heartbeat, 0.1);
        on_heartbeat(h.loop, &h.heartbeat, 0);
        atomic_store_explicit(&opts->wslot->state, SPK_W_READY, memory_order_release);
    } else {
        raise(SIGUSR1);
    }
    if (h.tokens == NULL && cfg->tls_client_ca == NULL && opts->index == 0)
        spk_warn("no edge is authenticated (neither auth.token_file nor tls.client_ca): any "
                 "process that reaches %s may send as any edge; allowed on loopback only",
                 cfg->n_listen ? cfg->listen[0] : "the listener");
    spk_info("serving gRPC on %s (%s) with %zu control plugins",
             cfg->n_listen ? cfg->listen[0] : "?", h.tls ? "TLS" : "h2c", h.set.n);

    ev_run(h.loop, 0);
    rc = h.result;

    ev_timer_stop(h.loop, &h.tick);
    ev_timer_stop(h.loop, &h.heartbeat);
    ev_timer_stop(h.loop, &h.health);
    ev_timer_stop(h.loop, &h.expire);
    ev_timer_stop(h.loop, &h.drain_check);
    ev_timer_stop(h.loop, &h.drain_deadline);
    ev_signal_stop(h.loop, &h.sig_term);
    ev_signal_stop(h.loop, &h.sig_int);
    ev_signal_stop(h.loop, &h.sig_quit);
    ev_signal_stop(h.loop, &h.sig_go);
out:
    /* Calls still waiting are answered (their peers see UNAVAILABLE and resend). */
    while (h.pending != NULL) {
        pending *pe = h.pending;
        h.pending = pe->next;
        spk_grpc_call_fail(pe->call, SPK_GRPC_UNAVAILABLE, "hubd worker stopping");
        pending_free(pe);
    }
    ev_prepare_stop(h.loop, &h.group);
    spk_grpc_server_free(h.srv);
    spk_chain_free(&h.chain);
    spk_host_unload(&h.set);
    spk_host_env_fini(&h.env);
    spk_hub_tokens_free(h.tokens);
    if (h.tls != NULL)
        SSL_CTX_free(h.tls);
    spk_kv_close(h.kv);
    free(h.health_fails);
    return rc;
}
