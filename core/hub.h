/*
 * hub.h -- one hubd worker: the gRPC server that edges' uplinks call, the control plugins
 * it hands their payloads to, and the store that makes each delivery happen once.
 *
 * hubd's supervisor (the same as spoked's, core/supervisor.h) starts N of these on the
 * shared listening sockets. Each one runs one libev loop with:
 *
 *   - a gRPC server (transport/grpc_server.h): h2c, or TLS with ALPN h2 when tls.cert is
 *     set, serving spoke.control.v1.EdgeControl (SendPluginControlBatch, Heartbeat) and
 *     grpc.health.v1.Health/Check; anything else is UNIMPLEMENTED;
 *   - the control plugins (plugins.list), loaded with the control role's host table;
 *   - the store (core/kv.h) at hub.store, shared by all workers: dedupe marks, the
 *     registry of edges, and the plugins' KV namespaces.
 *
 * AUTHENTICATION (core/hub_auth.h): every EdgeControl call is checked against
 * auth.token_file and/or the client certificate; a call for another edge's ID is
 * PERMISSION_DENIED.
 *
 * EXACTLY ONCE. The batches that arrive in one turn of the loop are processed together
 * in ONE write transaction (group commit): for each payload, in order, its (edge ID,
 * sequence) mark is looked up and set; a payload seen before is DUPLICATE; a new one is
 * handed to the control plugin with its plugin ID inside a nested transaction that holds
 * the plugin's KV writes (a plugin answering handled = 0 passes it to the others in config
 * order). The transaction is committed and flushed, then every batch is answered. A hub
 * that dies before the commit has answered nothing and kept nothing: the edge resends and
 * the KV state changes once. A payload whose plugin ID has no control plugin is answered
 * NO_RECEIVER and not marked, so it is delivered when the plugin is deployed.
 *
 * SIGTERM: stop accepting, GOAWAY, answer what arrived, exit when the connections are
 * gone (at most plugins.drain_timeout). SIGQUIT: at once. SIGUSR1: start accepting (the
 * supervisor's go, as for spoked's workers).
 */
#ifndef SPK_HUB_H
#define SPK_HUB_H

#include <stddef.h>

#include "config.h"
#include "err.h"
#include "status.h"

typedef struct spk_hub_opts {
    const int *listen_fds;         /* borrowed, already listening */
    size_t n_listen;
    spk_wslot *wslot;              /* the supervisor's slot; NULL: unsupervised */
    const char *const *quarantine; /* plugin keys not to load */
    size_t n_quarantine;
    int index;                     /* the worker's number: 0 also expires dedupe marks */
} spk_hub_opts;

/* Serve until stopped. Returns 0 after a clean stop, or an error with the reason in eb
 * when it could not start (store, TLS files, token file, a plugin's init). */
int spk_hub_worker_run(spk_config *cfg, const spk_hub_opts *opts, spk_errbuf *eb);

/* The store key of an edge's registry entry in namespace 0 ("edge/" + edge ID), into
 * buf[cap]; returns its length. */
size_t spk_hub_edge_key(const char *edge_id, char *buf, size_t cap);

/* An edge's registry entry: this header, then the edge's last HeartbeatRequest as it was
 * encoded (possibly empty). */
typedef struct spk_hub_edge_rec {
    int64_t last_heartbeat_ms;   /* Unix ms; 0: none yet */
    int64_t last_batch_ms;
    uint64_t batches;
    uint64_t payloads;           /* delivered (ACCEPTED) */
    uint64_t duplicates;
    uint64_t no_receiver;
    uint64_t refused;
} spk_hub_edge_rec;

/* Check one decoded payload of a batch as hubd does before delivering it: a plugin ID, the
 * edge's limits (spk_queue_validate: one rule for both ends) and UTF-8 strings. md (room
 * for SPOKE_MAX_METADATA entries) receives p's metadata, borrowing p's strings. Returns 0,
 * or -1 with r->outcome REFUSED, r->code a static name and r->reason malloc'd (the caller
 * frees it unless it is protobuf_c_empty_string). Exposed for fuzz/fuzz_edge_batch.c. */
struct Spoke__Control__V1__EdgePayload;
struct Spoke__Control__V1__PayloadResult;
int spk_hub_payload_validate(const struct Spoke__Control__V1__EdgePayload *p, spoke_kv *md,
                             struct Spoke__Control__V1__PayloadResult *r);

#endif
