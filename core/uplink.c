/*
 * uplink.c -- drains the edge's queue to hubd (the contract is in uplink.h).
 *
 * One loop, three timers: `beat` every heartbeat (Heartbeat call, then drain), `poll`
 * every POLL_MS (a whole batch waiting? send it now; also stamps the status slot's
 * heartbeat for the supervisor's watchdog) and `retry` (the backoff after a failure).
 * send_next() is the one place a batch starts: it does nothing while a batch is in flight
 * or a backoff runs, reads the oldest sendable records, encodes them and starts the call.
 * on_batch_done() applies the answer: acks, parks, counts, and either continues the drain
 * or schedules the retry.
 *
 * ENCODING. A SendPluginControlBatchRequest is built by hand around the stored bytes: the
 * queue keeps each record as an encoded EdgePayload, and a repeated message field is the
 * concatenation of (tag 3, length, bytes) per element, so the request is the two identity
 * fields followed by each record's bytes, framed; nothing is decoded or re-encoded.
 */
#include "uplink.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "grpc_client.h"
#include "log.h"
#include "pbwire.h"
#include "queue.h"
#include "queue_conf.h"
#include "spoke/control/v1/control.pb-c.h"

#define POLL_MS 100
#define BATCH_PATH "/spoke.control.v1.EdgeControl/SendPluginControlBatch"
#define HEARTBEAT_PATH "/spoke.control.v1.EdgeControl/Heartbeat"
#define MAX_TOKEN 4096

typedef struct parked {
    uint32_t plugin_id;
    ev_tstamp until;   /* loop time after which its payloads are tried again */
} parked;

typedef struct uplink {
    struct ev_loop *loop;
    const spk_config *cfg;
    spk_wslot *slot;
    spk_queue *q;
    spk_grpc_client *cl;
    uint64_t heartbeat_ms;       /* in force: the config's, or what the hub asked for */
    uint32_t batch_size;
    size_t max_batch_bytes;
    ev_timer beat, poll, retry, last_drain;
    ev_signal sig_term, sig_int, sig_quit;
    bool draining;               /* a heartbeat's drain: go on until nothing is left */
    bool in_flight;              /* a batch call */
    bool backing_off;
    bool stopping;
    unsigned fails;              /* failed batch calls in a row */
    spk_queue_batch batch;       /* the batch in flight (at most one in memory) */
    size_t n_sent;               /* records of batch that were sent (corrupt ones are not) */
    uint64_t *sent_seq;          /* their sequence numbers, in order */
    uint8_t *req;                /* prefix room + the encoded request */
    size_t req_cap;
    uint8_t *hb_req;             /* the heartbeat call in flight (NULL: none) */
    parked *parked;
    size_t n_parked;
    uint64_t scan_from;          /* reads start here: below it every record is parked */
    spk_uplink_counters *ct;     /* the slot's counters, or own_ct unsupervised */
    spk_uplink_counters own_ct;
} uplink;

/* Count one event in the uplink's counters (the supervisor reads them). */
#define COUNT(u, field, n)                                                                 \
    atomic_store_explicit(&(u)->ct->field,                                                 \
                          atomic_load_explicit(&(u)->ct->field, memory_order_relaxed) + (n), \
                          memory_order_relaxed)
#define SET(u, field, v) atomic_store_explicit(&(u)->ct->field, (v), memory_order_relaxed)
#define GET(u, field) atomic_load_explicit(&(u)->ct->field, memory_order_relaxed)

/* ---- helpers ---------------------------------------------------------------------------- */

static const char *edge_id(const uplink *u)
{
    return u->cfg->edge_id != NULL ? u->cfg->edge_id : "";
}

static const char *edge_ns(const uplink *u)
{
    return u->cfg->edge_namespace != NULL ? u->cfg->edge_namespace : "";
}

static bool is_parked(const uplink *u, uint32_t plugin_id)
{
    for (size_t i = 0; i < u->n_parked; i++)
        if (u->parked[i].plugin_id == plugin_id)
            return true;
    return false;
}

static void park(uplink *u, uint32_t plugin_id)
{
    ev_tstamp until = ev_now(u->loop) +
                      (double)u->heartbeat_ms * SPK_UPLINK_PARK_BEATS / 1000.0;
    for (size_t i = 0; i < u->n_parked; i++) {
        if (u->parked[i].plugin_id == plugin_id) {
            u->parked[i].until = until;
            return;
        }
    }
    parked *np = realloc(u->parked, (u->n_parked + 1) * sizeof(*np));
    if (np == NULL)
        return; /* not parked: its payloads are simply tried again sooner */
    u->parked = np;
    u->parked[u->n_parked++] = (parked){plugin_id, until};
    SET(u, parked, (uint32_t)u->n_parked);
    spk_info("plugin %u: hubd has no control plugin with this ID yet; its payloads stay "
             "queued and are retried every %u heartbeats", plugin_id, SPK_UPLINK_PARK_BEATS);
}

/* Unpark the plugins whose time has come; returns whether any was. */
static bool unpark_due(uplink *u)
{
    bool any = false;
    ev_tstamp now = ev_now(u->loop);
    for (size_t i = 0; i < u->n_parked;) {
        if (u->parked[i].until <= now) {
            u->parked[i] = u->parked[--u->n_parked];
            SET(u, parked, (uint32_t)u->n_parked);
            u->scan_from = 0; /* its payloads are below the scan position: read from the start */
            any = true;
        } else {
            i++;
        }
    }
    return any;
}

static void stamp_slot(uplink *u)
{
    if (u->slot != NULL)
        atomic_store_explicit(&u->slot->act.heartbeat_ms, spk_mono_ms(), memory_order_relaxed);
}

/* Stopping ends once the last drain found nothing more (or failed) and no call is out. */
static void maybe_stop(uplink *u)
{
    if (u->stopping && !u->in_flight && !u->draining && u->hb_req == NULL)
        ev_break(u->loop, EVBREAK_ALL);
}

static uint64_t call_timeout_ms(const uplink *u)
{
    return u->cfg->uplink_timeout_ms;
}

/* ---- batches --------------------------------------------------------------------------- */

static void send_next(uplink *u);

/* Exponential backoff with full jitter: a uniformly random delay up to min(cap, base*2^n),
 * where the cap is the heartbeat (a hub that is down is tried at least once a beat). */
static void schedule_retry(uplink *u)
{
    double cap = (double)(u->heartbeat_ms < SPK_UPLINK_BACKOFF_MAX_MS ? u->heartbeat_ms
                                                                      : SPK_UPLINK_BACKOFF_MAX_MS);
    double ceil_ms = SPK_UPLINK_BACKOFF_MIN_MS * ldexp(1.0, u->fails < 20 ? (int)u->fails : 20);
    if (ceil_ms > cap)
        ceil_ms = cap;
    double ms = SPK_UPLINK_BACKOFF_MIN_MS + drand48() * (ceil_ms - SPK_UPLINK_BACKOFF_MIN_MS);
    if (ms < SPK_UPLINK_BACKOFF_MIN_MS)
        ms = SPK_UPLINK_BACKOFF_MIN_MS;
    u->backing_off = true;
    ev_timer_set(&u->retry, ms / 1000.0, 0.0);
    ev_timer_start(u->loop, &u->retry);
}

static void batch_release(uplink *u)
{
    spk_queue_batch_free(&u->batch);
    u->n_sent = 0;
    u->in_flight = false;
}

static void ack(uplink *u, const uint64_t *seqs, size_t n)
{
    if (n == 0)
        return;
    spk_errbuf eb;
    size_t done = 0;
    if (spk_queue_ack(u->q, seqs, n, &done, &eb) != 0)
        spk_error("could not delete %zu delivered payloads from the queue (they will be "
                  "sent again and dropped by hubd as duplicates): %s", n, eb.msg);
}

/* Apply a decoded answer. Returns false when it does not match the request (then nothing
 * is deleted and the batch is retried). */
static bool apply_results(uplink *u, const Spoke__Control__V1__SendPluginControlBatchResponse *r)
{
    if (r->n_results != u->n_sent) {
        spk_error("hubd answered %zu results for a batch of %zu payloads; keeping them all",
                  r->n_results, u->n_sent);
        return false;
    }
    for (size_t i = 0; i < r->n_results; i++) {
        if (r->results[i]->sequence != u->sent_seq[i]) {
            spk_error("hubd's result %zu is for sequence %llu, not %llu; keeping the batch", i,
                      (unsigned long long)r->results[i]->sequence,
                      (unsigned long long)u->sent_seq[i]);
            return false;
        }
    }
    /* Reuse sent_seq for the sequence numbers to delete, in place (j <= i). */
    size_t j = 0;
    for (size_t i = 0; i < r->n_results; i++) {
        const Spoke__Control__V1__PayloadResult *pr = r->results[i];
        uint64_t seq = pr->sequence;
        switch (pr->outcome) {
        case SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__ACCEPTED:
            COUNT(u, acked, 1);
            u->sent_seq[j++] = seq;
            break;
        case SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__DUPLICATE:
            COUNT(u, duplicates, 1);
            u->sent_seq[j++] = seq;
            break;
        case SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__REFUSED:
            COUNT(u, refused, 1);
            spk_error("hubd refused payload %llu (%s): %s; deleting it (resending cannot help)",
                      (unsigned long long)seq, pr->code, pr->reason);
            u->sent_seq[j++] = seq;
            break;
        case SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__NO_RECEIVER: {
            COUNT(u, no_receiver, 1);
            for (size_t k = 0; k < u->batch.n; k++)
                if (u->batch.items[k].seq == seq)
                    park(u, u->batch.items[k].plugin_id);
            break;
        }
        default:
            break; /* unknown outcome: keep it */
        }
    }
    ack(u, u->sent_seq, j);
    return true;
}

static void on_batch_done(void *arg, const spk_grpc_result *res)
{
    uplink *u = arg;
    bool ok = false;
    bool full = u->batch.n >= u->batch_size;
    if (res->status == SPK_GRPC_OK) {
        Spoke__Control__V1__SendPluginControlBatchResponse *r =
            spoke__control__v1__send_plugin_control_batch_response__unpack(NULL, res->msg_len,
                                                                           res->msg);
        if (r == NULL)
            spk_error("hubd's answer to a batch does not decode; keeping the batch");
        else
            ok = apply_results(u, r);
        spoke__control__v1__send_plugin_control_batch_response__free_unpacked(r, NULL);
    } else {
        /* Log the first failure and then every tenth, so a hub that is down for an hour
         * does not write thousands of lines. */
        if (u->fails % 10 == 0)
            spk_log(spk_grpc_code_transient(res->status) ? SPOKE_LOG_WARN : SPOKE_LOG_ERROR,
                    "batch of %zu payloads not delivered: %s (%s); retrying with backoff",
                    u->n_sent, spk_grpc_code_name(res->status), res->message);
    }
    batch_release(u);
    SET(u, last_status, (uint32_t)(res->status == SPK_GRPC_OK && !ok ? SPK_GRPC_INTERNAL
                                                                    : res->status));
    SET(u, last_rtt_us, (uint64_t)(res->seconds * 1e6));
    if (ok) {
        if (u->fails > 0)
            spk_info("hubd reachable again after %u failed calls", u->fails);
        u->fails = 0;
        COUNT(u, batches_ok, 1);
        SET(u, last_ok_ms, (uint64_t)(ev_now(u->loop) * 1000.0));
        /* A full batch means more may be waiting; a heartbeat's drain goes on regardless
         * until a read finds nothing. */
        if (full || u->draining)
            send_next(u);
    } else {
        u->fails++;
        COUNT(u, batches_failed, 1);
        if (u->stopping)
            u->draining = false; /* the last drain gives up: the rest waits for the next start */
        else
            schedule_retry(u);
    }
    maybe_stop(u);
}

/* Read the oldest sendable records into u->batch, from u->scan_from on. Records of parked
 * plugins are passed over; corrupt ones are deleted (they cannot be sent). Everything below
 * scan_from is parked (or gone), so a backlog of parked payloads is read past once, not at
 * every batch; unparking a plugin resets it. Reads at most READ_ROUNDS batches' worth of
 * records per call, so the loop stays responsive; the rest waits for the next poll.
 * Returns the number to send. */
#define READ_ROUNDS 16

static size_t read_batch(uplink *u)
{
    spk_errbuf eb;
    for (int round = 0; round < READ_ROUNDS; round++) {
        spk_queue_batch_free(&u->batch);
        if (spk_queue_read_from(u->q, u->scan_from, u->batch_size, u->max_batch_bytes,
                                &u->batch, &eb) != 0) {
            spk_error("reading the queue: %s", eb.msg);
            return 0;
        }
        if (u->batch.n == 0)
            return 0;
        uint64_t *seq = realloc(u->sent_seq, (u->batch.n + 1) * sizeof(*seq));
        if (seq == NULL) {
            spk_queue_batch_free(&u->batch);
            return 0;
        }
        u->sent_seq = seq;
        u->n_sent = 0;
        size_t kept = 0;
        bool all_parked_so_far = true;
        uint64_t last = 0;
        for (size_t i = 0; i < u->batch.n; i++) {
            spk_queue_item *it = &u->batch.items[i];
            last = it->seq;
            if (it->status != 0) {
                COUNT(u, damaged, 1);
                spk_error("queued payload %llu of plugin %u is damaged (CRC mismatch); "
                          "deleting it", (unsigned long long)it->seq, it->plugin_id);
                ack(u, &it->seq, 1);
                continue;
            }
            if (is_parked(u, it->plugin_id)) {
                if (all_parked_so_far)
                    u->scan_from = it->seq + 1;
                continue;
            }
            all_parked_so_far = false;
            u->batch.items[kept++] = *it;
        }
        u->batch.n = kept;
        if (kept > 0)
            return kept;
        u->scan_from = last + 1; /* every record of this read was parked or damaged */
    }
    spk_queue_batch_free(&u->batch);
    return 0;
}

/* Encode u->batch as a request after the prefix room of u->req; *len gets its size. */
static int encode_batch(uplink *u, size_t *len)
{
    size_t n = spk_pb_bytes_len(1, strlen(edge_id(u))) + spk_pb_bytes_len(2, strlen(edge_ns(u)));
    for (size_t i = 0; i < u->batch.n; i++)
        n += spk_pb_bytes_len(3, u->batch.items[i].wire_len);
    if (SPK_GRPC_PREFIX + n > u->req_cap) {
        uint8_t *nb = realloc(u->req, SPK_GRPC_PREFIX + n);
        if (nb == NULL)
            return SPK_ENOMEM;
        u->req = nb;
        u->req_cap = SPK_GRPC_PREFIX + n;
    }
    uint8_t *p = u->req + SPK_GRPC_PREFIX;
    p = spk_pb_put_bytes(p, 1, edge_id(u), strlen(edge_id(u)));
    p = spk_pb_put_bytes(p, 2, edge_ns(u), strlen(edge_ns(u)));
    for (size_t i = 0; i < u->batch.n; i++) {
        p = spk_pb_put_bytes(p, 3, u->batch.items[i].wire, u->batch.items[i].wire_len);
        u->sent_seq[i] = u->batch.items[i].seq;
    }
    u->n_sent = u->batch.n;
    *len = n;
    return 0;
}

static void send_next(uplink *u)
{
    if (u->in_flight || u->backing_off)
        return;
    if (read_batch(u) == 0) {
        spk_queue_batch_free(&u->batch);
        u->draining = false;
        return;
    }
    spk_errbuf eb;
    size_t len = 0;
    int rc = encode_batch(u, &len);
    if (rc == 0)
        rc = spk_grpc_client_call(u->cl, BATCH_PATH, u->req, len, call_timeout_ms(u),
                                  on_batch_done, u, &eb);
    else
        spk_errf(&eb, rc, "out of memory for a batch request");
    if (rc != 0) {
        spk_error("cannot start a batch call: %s", eb.msg);
        spk_queue_batch_free(&u->batch);
        u->fails++;
        schedule_retry(u);
        return;
    }
    u->in_flight = true;
}

/* ---- heartbeat ------------------------------------------------------------------------- */

static void on_heartbeat_done(void *arg, const spk_grpc_result *res)
{
    uplink *u = arg;
    free(u->hb_req);
    u->hb_req = NULL;
    if (res->status != SPK_GRPC_OK) {
        spk_debug("heartbeat: %s (%s)", spk_grpc_code_name(res->status), res->message);
        maybe_stop(u);
        return;
    }
    Spoke__Control__V1__HeartbeatResponse *r =
        spoke__control__v1__heartbeat_response__unpack(NULL, res->msg_len, res->msg);
    if (r == NULL) {
        spk_warn("heartbeat: hubd's answer does not decode");
        maybe_stop(u);
        return;
    }
    COUNT(u, heartbeats_ok, 1);
    /* The hub may tune the edge; values out of the config's own ranges are ignored. */
    if (r->heartbeat_interval_ms >= 100 && r->heartbeat_interval_ms <= 86400000 &&
        r->heartbeat_interval_ms != u->heartbeat_ms) {
        spk_info("hubd asks for a heartbeat of %llu ms (was %llu)",
                 (unsigned long long)r->heartbeat_interval_ms, (unsigned long long)u->heartbeat_ms);
        u->heartbeat_ms = r->heartbeat_interval_ms;
        ev_timer_set(&u->beat, (double)u->heartbeat_ms / 1000.0, (double)u->heartbeat_ms / 1000.0);
        ev_timer_again(u->loop, &u->beat);
    }
    if (r->batch_size >= 1 && r->batch_size <= 10000)
        u->batch_size = r->batch_size;
    spoke__control__v1__heartbeat_response__free_unpacked(r, NULL);
    maybe_stop(u);
}

/* Copy the plugin list the supervisor publishes in the slot (status.h: plugins_seq is odd
 * while it writes). Returns how many; 0 when unsupervised or mid-write. */
static size_t copy_plugins(const uplink *u, spk_plugin_info *out)
{
    if (u->slot == NULL)
        return 0;
    for (int tries = 0; tries < 3; tries++) {
        uint32_t s1 = atomic_load_explicit(&u->slot->plugins_seq, memory_order_acquire);
        if (s1 & 1)
            continue;
        uint32_t n = atomic_load_explicit(&u->slot->n_plugins, memory_order_relaxed);
        if (n > SPK_STATUS_PLUGINS)
            n = SPK_STATUS_PLUGINS;
        memcpy(out, u->slot->plugins, n * sizeof(*out));
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&u->slot->plugins_seq, memory_order_relaxed) == s1) {
            for (uint32_t i = 0; i < n; i++) {
                out[i].name[sizeof(out[i].name) - 1] = '\0';
                out[i].version[sizeof(out[i].version) - 1] = '\0';
            }
            return n;
        }
    }
    return 0;
}

static void send_heartbeat(uplink *u)
{
    if (u->hb_req != NULL)
        return; /* the last one is still out */
    spk_queue_stats st;
    spk_errbuf eb;
    Spoke__Control__V1__HeartbeatRequest hb = SPOKE__CONTROL__V1__HEARTBEAT_REQUEST__INIT;
    hb.edge_id = (char *)edge_id(u);
    hb.edge_namespace = (char *)edge_ns(u);
    hb.spoke_version = (char *)SPOKE_VERSION;
    if (spk_queue_stats_get(u->q, &st, &eb) == 0) {
        hb.queue_depth = st.pending;
        hb.queue_oldest_age_ms = st.oldest_age_ms;
        spk_queue_stats_free(&st);
    }
    /* The serving plugins, as the supervisor published them in this slot. */
    spk_plugin_info info[SPK_STATUS_PLUGINS];
    Spoke__Control__V1__PluginStatus ps[SPK_STATUS_PLUGINS], *psp[SPK_STATUS_PLUGINS];
    size_t n = copy_plugins(u, info);
    for (size_t i = 0; i < n; i++) {
        spoke__control__v1__plugin_status__init(&ps[i]);
        ps[i].id = info[i].id;
        ps[i].name = info[i].name;
        ps[i].version = info[i].version;
        ps[i].state = info[i].quarantined ? SPOKE__CONTROL__V1__PLUGIN_STATUS__STATE__QUARANTINED
                                          : SPOKE__CONTROL__V1__PLUGIN_STATUS__STATE__ACTIVE;
        psp[i] = &ps[i];
    }
    hb.plugins = psp;
    hb.n_plugins = n;
    size_t len = spoke__control__v1__heartbeat_request__get_packed_size(&hb);
    u->hb_req = malloc(SPK_GRPC_PREFIX + len);
    if (u->hb_req == NULL)
        return;
    spoke__control__v1__heartbeat_request__pack(&hb, u->hb_req + SPK_GRPC_PREFIX);
    if (spk_grpc_client_call(u->cl, HEARTBEAT_PATH, u->hb_req, len, call_timeout_ms(u),
                             on_heartbeat_done, u, &eb) != 0) {
        spk_warn("heartbeat: %s", eb.msg);
        free(u->hb_req);
        u->hb_req = NULL;
    }
}

/* ---- timers and signals ---------------------------------------------------------------- */

/* Payloads older than queue.retention are dropped (counted in the queue's `expired`). */
static void expire(uplink *u)
{
    uint64_t n = 0;
    spk_errbuf eb;
    if (spk_queue_expire(u->q, &n, &eb) != 0)
        spk_warn("queue expiry: %s", eb.msg);
    else if (n > 0)
        spk_warn("%llu payloads were older than queue.retention and were dropped undelivered",
                 (unsigned long long)n);
}

static void on_beat(struct ev_loop *loop, ev_timer *w, int revents)
{
    uplink *u = w->data;
    (void)loop, (void)revents;
    expire(u);
    send_heartbeat(u);
    unpark_due(u);
    u->draining = true;
    send_next(u);
}

static void on_poll(struct ev_loop *loop, ev_timer *w, int revents)
{
    uplink *u = w->data;
    (void)loop, (void)revents;
    stamp_slot(u);
    if (u->in_flight || u->backing_off)
        return;
    spk_queue_stats st;
    if (spk_queue_stats_get(u->q, &st, NULL) != 0)
        return;
    uint64_t pending = st.pending;
    spk_queue_stats_free(&st);
    if (pending >= u->batch_size)
        send_next(u);
}

static void on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
    uplink *u = w->data;
    (void)loop, (void)revents;
    u->backing_off = false;
    send_next(u);
}

static void on_stop(struct ev_loop *loop, ev_signal *w, int revents)
{
    uplink *u = w->data;
    (void)revents;
    if (w->signum == SIGQUIT) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    if (u->stopping)
        return;
    /* spoked's supervisor stops the uplink after its workers exited, so what their fini
     * queued is here: one last drain, bounded by the call deadline, then exit. */
    u->stopping = true;
    ev_timer_stop(loop, &u->retry);
    ev_timer_stop(loop, &u->beat);
    ev_timer_stop(loop, &u->poll);
    u->backing_off = false;
    u->draining = true;
    ev_timer_set(&u->last_drain, (double)(2 * call_timeout_ms(u)) / 1000.0, 0.0);
    ev_timer_start(loop, &u->last_drain);
    send_next(u);
    maybe_stop(u);
}

static void on_last_drain_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents, (void)w;
    spk_warn("stopping with payloads still queued: the last drain ran out of time");
    ev_break(loop, EVBREAK_ALL);
}

/* ---- setup ------------------------------------------------------------------------------- */

/* The token file's first line. Refused when others may read it: a bearer token is a
 * password. */
static int read_token(const char *path, char **out, spk_errbuf *eb)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return spk_errf(eb, SPK_EIO, "uplink.token_file %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || (sb.st_mode & 0077) != 0) {
        close(fd);
        return spk_errf(eb, SPK_ECONFIG, "uplink.token_file %s: readable by group or others "
                        "(mode %03o); chmod 600 it", path, (unsigned)(sb.st_mode & 0777));
    }
    char buf[MAX_TOKEN + 2];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n < 0)
        return spk_errf(eb, SPK_EIO, "uplink.token_file %s: %s", path, strerror(errno));
    buf[n] = '\0';
    buf[strcspn(buf, "\r\n")] = '\0';
    if (buf[0] == '\0' || strlen(buf) > MAX_TOKEN)
        return spk_errf(eb, SPK_ECONFIG, "uplink.token_file %s: %s", path,
                        buf[0] == '\0' ? "empty" : "token longer than 4096 bytes");
    *out = strdup(buf);
    explicit_bzero(buf, sizeof(buf));
    return *out != NULL ? 0 : spk_errf(eb, SPK_ENOMEM, "out of memory");
}

int spk_uplink_run(const spk_config *cfg, spk_wslot *slot, spk_errbuf *eb)
{
    if (cfg->uplink_url == NULL)
        return spk_errf(eb, SPK_ECONFIG, "no uplink.url configured");
    uplink u = {.cfg = cfg, .slot = slot, .loop = ev_default_loop(EVFLAG_AUTO)};
    u.ct = slot != NULL ? &slot->uplink : &u.own_ct;
    if (u.loop == NULL)
        return spk_errf(eb, SPK_EIO, "cannot create the event loop");
    u.heartbeat_ms = cfg->uplink_heartbeat_ms;
    u.batch_size = cfg->uplink_batch_size;
    u.max_batch_bytes = (size_t)cfg->uplink_max_batch_bytes;
    srand48((long)getpid() ^ (long)spk_mono_ms());

    char *token = NULL;
    int rc = cfg->uplink_token_file != NULL ? read_token(cfg->uplink_token_file, &token, eb) : 0;
    if (rc == 0)
        rc = spk_queue_conf_open(cfg, &u.q, eb);
    if (rc == 0) {
        spk_grpc_client_opts co = {.url = cfg->uplink_url, .ca_file = cfg->uplink_ca,
                                   .cert_file = cfg->uplink_cert, .key_file = cfg->uplink_key,
                                   .token = token};
        rc = spk_grpc_client_new(u.loop, &co, &u.cl, eb);
    }
    if (token != NULL) {
        explicit_bzero(token, strlen(token));
        free(token);
    }
    if (rc != 0) {
        spk_queue_close(u.q);
        return rc;
    }

    double beat = (double)u.heartbeat_ms / 1000.0;
    ev_timer_init(&u.beat, on_beat, beat, beat);
    ev_timer_init(&u.poll, on_poll, POLL_MS / 1000.0, POLL_MS / 1000.0);
    ev_timer_init(&u.retry, on_retry, 0.0, 0.0);
    ev_timer_init(&u.last_drain, on_last_drain_deadline, 0.0, 0.0);
    u.beat.data = u.poll.data = u.retry.data = u.last_drain.data = &u;
    ev_timer_start(u.loop, &u.beat);
    ev_timer_start(u.loop, &u.poll);
    ev_signal_init(&u.sig_term, on_stop, SIGTERM);
    ev_signal_init(&u.sig_int, on_stop, SIGINT);
    ev_signal_init(&u.sig_quit, on_stop, SIGQUIT);
    u.sig_term.data = u.sig_int.data = u.sig_quit.data = &u;
    ev_signal_start(u.loop, &u.sig_term);
    ev_signal_start(u.loop, &u.sig_int);
    ev_signal_start(u.loop, &u.sig_quit);
    if (slot != NULL)
        atomic_store(&slot->state, SPK_W_READY);
    stamp_slot(&u);
    spk_info("uplink to %s: heartbeat %llu ms, batches of up to %u payloads", cfg->uplink_url,
             (unsigned long long)u.heartbeat_ms, u.batch_size);

    /* The first heartbeat and drain go out at once: an edge that restarts with a backlog
     * starts delivering it without waiting a whole interval. */
    on_beat(u.loop, &u.beat, 0);
    ev_run(u.loop, 0);

    spk_info("uplink stopping: %llu batches delivered, %llu failed; payloads acked %llu, "
             "duplicates %llu, refused %llu, no receiver %llu, damaged %llu",
             (unsigned long long)GET(&u, batches_ok), (unsigned long long)GET(&u, batches_failed),
             (unsigned long long)GET(&u, acked), (unsigned long long)GET(&u, duplicates),
             (unsigned long long)GET(&u, refused), (unsigned long long)GET(&u, no_receiver),
             (unsigned long long)GET(&u, damaged));
    ev_timer_stop(u.loop, &u.beat);
    ev_timer_stop(u.loop, &u.poll);
    ev_timer_stop(u.loop, &u.retry);
    ev_timer_stop(u.loop, &u.last_drain);
    ev_signal_stop(u.loop, &u.sig_term);
    ev_signal_stop(u.loop, &u.sig_int);
    ev_signal_stop(u.loop, &u.sig_quit);
    spk_grpc_client_free(u.cl);
    free(u.hb_req);
    spk_queue_batch_free(&u.batch);
    spk_queue_close(u.q);
    free(u.req);
    free(u.sent_seq);
    free(u.parked);
    return 0;
}
