/*
 * status.h -- the shared-memory region where workers tell the supervisor what they do.
 *
 * The supervisor creates the region (a memfd, mapped shared) before starting any worker;
 * each worker maps it too and owns one slot. A worker writes, the supervisor reads:
 *
 *   act        which plugin and hook run now and a sequence number bumped on every hook
 *              entry (slot.h: its type, the helpers that stamp it and their store order),
 *              and a heartbeat the worker's loop stamps every 100 ms. The supervisor samples
 *              them: the same (plugin, seq) seen for longer than hook_timeout is a slow hook.
 *   state      STARTING until the worker serves, then READY; DRAINING once asked to stop.
 *   plugins    the chain the worker loaded (name, version, quarantine key), written before
 *              the first init, so a crash in init is attributed like any other.
 *   reason     why a worker that could not start gave up (exit code SPK_EXIT_START).
 *   queue      send_to_control counters: accepted, refused by reason (metrics).
 *   hooks, pm  hook stats and the plugins' own metrics (metrics.h).
 *
 * Plain data only: no pointers (the region is mapped at different addresses), no locks
 * (a worker killed mid-write must not block the supervisor). Fields are read with relaxed
 * atomics; strings are written before the release store of the state/count that publishes
 * them.
 */
#ifndef SPK_STATUS_H
#define SPK_STATUS_H

#include <stdatomic.h>
#include <stdint.h>

#include "config.h"
#include "err.h"
#include "metrics.h"
#include "slot.h"

/* Slots for the workers of a serving, a starting and a draining generation at the
 * maximum, and the uplink (more generations drain at once when they are smaller). The
 * region is a memfd: a slot no worker ever used costs no memory. */
#define SPK_STATUS_SLOTS (3 * SPK_WORKERS_MAX + 1)
#define SPK_STATUS_PLUGINS SPK_PLUGINS_MAX
/* metrics.h sizes the hook stats by plugin without seeing this header. */
_Static_assert(SPK_METRICS_PLUGINS == SPK_STATUS_PLUGINS,
               "metrics.h: SPK_METRICS_PLUGINS must equal SPK_STATUS_PLUGINS");

/* Worker exit codes the supervisor understands. */
#define SPK_EXIT_START 3  /* could not start: reason in the slot */
#define SPK_EXIT_HEALTH 4 /* a plugin failed its health check health_fail_limit times */

enum spk_wstate {
    SPK_W_FREE = 0,
    SPK_W_STARTING = 1,
    SPK_W_READY = 2,
    SPK_W_DRAINING = 3,
};

typedef struct spk_plugin_info {
    char name[64];
    char version[32];
    char key[256]; /* quarantine key: "name@path" as configured (see loader.h) */
    uint32_t id;   /* the configured plugin ID (0: none) */
    uint32_t quarantined; /* the uplink's slot only: 1 for a quarantined plugin */
} spk_plugin_info;

/* Why send_to_control refused a payload; counted per worker in spk_wslot.queue. */
enum spk_qrefuse {
    SPK_QR_PAYLOAD_TOO_LARGE,
    SPK_QR_TOO_MANY_METADATA,
    SPK_QR_METADATA_KEY,
    SPK_QR_METADATA_VALUE,
    SPK_QR_CORRELATION_ID,
    SPK_QR_NOT_JSON,
    SPK_QR_QUEUE_FULL,
    SPK_QR_UNAVAILABLE, /* the queue could not be opened or written (disk/map full, I/O) */
    SPK_QR_INVALID,     /* NULL arguments, text that is not UTF-8 */
    SPK_QR_N
};

/* The metric label of a refusal reason ("payload_too_large"). */
static inline const char *spk_qrefuse_name(int r)
{
    static const char *const names[SPK_QR_N] = {
        "payload_too_large", "too_many_metadata", "metadata_key_too_long",
        "metadata_value_too_long", "correlation_id_too_long", "not_json", "queue_full",
        "unavailable", "invalid",
    };
    return r >= 0 && r < SPK_QR_N ? names[r] : "unknown";
}

/* send_to_control counters of one worker (since it started; a restarted worker starts
 * again at zero, and the supervisor adds an exited worker's final counts to its own
 * totals when it frees the slot). Written by the worker with relaxed atomics, read by
 * the supervisor. */
typedef struct spk_queue_counters {
    _Atomic uint64_t sent;               /* payloads accepted */
    _Atomic uint64_t refused[SPK_QR_N];  /* payloads refused, by reason */
    _Atomic uint32_t unavailable;        /* 1: the worker could not open the queue */
} spk_queue_counters;

/* The uplink's counters (its slot only; core/uplink.h), since it started: the supervisor
 * adds an exited uplink's counts to its own totals, as for send_to_control's. */
typedef struct spk_uplink_counters {
    _Atomic uint64_t batches_ok;      /* batch calls answered OK */
    _Atomic uint64_t batches_failed;  /* batch calls that failed (each is retried) */
    _Atomic uint64_t acked;           /* payloads answered ACCEPTED (deleted) */
    _Atomic uint64_t duplicates;      /* payloads answered DUPLICATE (deleted) */
    _Atomic uint64_t refused;         /* payloads answered REFUSED (deleted, logged) */
    _Atomic uint64_t no_receiver;     /* NO_RECEIVER answers (the payload stays queued) */
    _Atomic uint64_t damaged;         /* records that failed their CRC (deleted, logged) */
    _Atomic uint64_t heartbeats_ok;
    _Atomic uint64_t last_ok_ms;      /* Unix ms of the last batch answered OK; 0: none */
    _Atomic uint64_t last_rtt_us;     /* round trip of the last batch call */
    _Atomic uint32_t last_status;     /* gRPC status of the last batch call */
    _Atomic uint32_t parked;          /* plugins whose payloads wait for a receiver */
} spk_uplink_counters;

/* hubd: payloads by plugin ID and outcome (the outcomes of spk_hub_counters, and
 * accept_edge_payload errors). At most SPK_HUB_PLUGIN_IDS IDs; later ones count under
 * the last entry, whose id is then SPK_HUB_OTHER_ID. */
#define SPK_HUB_PLUGIN_IDS 64
#define SPK_HUB_OTHER_ID UINT32_MAX
enum spk_hub_outcome {
    SPK_HO_ACCEPTED, SPK_HO_DUPLICATE, SPK_HO_NO_RECEIVER, SPK_HO_REFUSED, SPK_HO_ERROR, SPK_HO_N
};
static inline const char *spk_hub_outcome_name(int o)
{
    static const char *const names[SPK_HO_N] = {"accepted", "duplicate", "no_receiver",
                                                "refused", "error"};
    return o >= 0 && o < SPK_HO_N ? names[o] : "unknown";
}
typedef struct spk_hub_by_plugin {
    _Atomic uint32_t n; /* entries published (release) */
    struct {
        uint32_t id;
        _Atomic uint64_t v[SPK_HO_N];
    } e[SPK_HUB_PLUGIN_IDS];
} spk_hub_by_plugin;

/* The entry of plugin `id` in t, created (one writer; the id written before the count
 * that publishes it). Never NULL. */
static inline _Atomic uint64_t *spk_hub_by_plugin_of(spk_hub_by_plugin *t, uint32_t id)
{
    uint32_t n = atomic_load_explicit(&t->n, memory_order_relaxed);
    for (uint32_t i = 0; i < n; i++)
        if (t->e[i].id == id || (i == SPK_HUB_PLUGIN_IDS - 1 && t->e[i].id == SPK_HUB_OTHER_ID))
            return t->e[i].v;
    if (n == SPK_HUB_PLUGIN_IDS)
        return t->e[n - 1].v; /* unreachable: the last entry is "other" once full */
    t->e[n].id = n == SPK_HUB_PLUGIN_IDS - 1 ? SPK_HUB_OTHER_ID : id;
    atomic_store_explicit(&t->n, n + 1, memory_order_release);
    return t->e[n].v;
}

/* A hubd worker's counters (core/hub.h), since it started. */
typedef struct spk_hub_counters {
    _Atomic uint64_t batches;        /* SendPluginControlBatch calls committed */
    _Atomic uint64_t accepted;       /* payloads delivered to a control plugin */
    _Atomic uint64_t duplicates;     /* payloads seen before (edge ID, sequence) */
    _Atomic uint64_t no_receiver;    /* payloads whose plugin ID has no control plugin */
    _Atomic uint64_t refused;        /* payloads over a limit or malformed */
    _Atomic uint64_t plugin_errors;  /* accept_edge_payload returned an error */
    _Atomic uint64_t auth_failures;  /* calls refused UNAUTHENTICATED / PERMISSION_DENIED */
    spk_hub_by_plugin by_plugin;
} spk_hub_counters;

/* *to += *from, field by field (the supervisor's totals of exited workers). */
static inline void spk_hub_counters_add(spk_hub_counters *to, const spk_hub_counters *from)
{
#define SPK_HUB_ADD(f)                                                                     \
    atomic_store_explicit(&to->f,                                                          \
                          atomic_load_explicit(&to->f, memory_order_relaxed) +             \
                              atomic_load_explicit(&from->f, memory_order_relaxed),        \
                          memory_order_relaxed)
    SPK_HUB_ADD(batches);
    SPK_HUB_ADD(accepted);
    SPK_HUB_ADD(duplicates);
    SPK_HUB_ADD(no_receiver);
    SPK_HUB_ADD(refused);
    SPK_HUB_ADD(plugin_errors);
    SPK_HUB_ADD(auth_failures);
#undef SPK_HUB_ADD
    uint32_t n = atomic_load_explicit(&from->by_plugin.n, memory_order_acquire);
    for (uint32_t i = 0; i < n && i < SPK_HUB_PLUGIN_IDS; i++) {
        _Atomic uint64_t *v = spk_hub_by_plugin_of(&to->by_plugin, from->by_plugin.e[i].id);
        for (int o = 0; o < SPK_HO_N; o++)
            atomic_store_explicit(&v[o],
                                  atomic_load_explicit(&v[o], memory_order_relaxed) +
                                      atomic_load_explicit(&from->by_plugin.e[i].v[o],
                                                           memory_order_relaxed),
                                  memory_order_relaxed);
    }
}

/* What the policy engine (core/policy.h) did in one worker, since it started. Written by
 * the worker with relaxed atomics, read by the supervisor (`spoked status`). */
typedef struct spk_policy_counters {
    _Atomic uint64_t matched;       /* signals a policy matched */
    _Atomic uint64_t errors;        /* a condition or Lua action raised an error */
    _Atomic uint64_t timeouts;      /* ... ran past policies.timeout instructions */
    _Atomic uint64_t memory;        /* ... ran out of policies.memory */
    _Atomic uint64_t action_failed; /* a built-in action failed (queue refused, no conn) */
} spk_policy_counters;

typedef struct spk_wslot {
    spk_slot act;
    _Atomic uint32_t state;
    _Atomic uint32_t n_plugins;     /* entries of plugins[] published */
    _Atomic uint32_t health_failed; /* chain index + 1 of the plugin whose health failed */
    _Atomic uint64_t conns_active;
    _Atomic uint64_t conns_total;
    spk_plugin_info plugins[SPK_STATUS_PLUGINS];
    char reason[1024];
    spk_queue_counters queue;       /* send_to_control of this worker's plugins */
    /* The uplink's slot: the supervisor publishes the serving plugins in plugins[] for the
     * heartbeat; plugins_seq is odd while it writes them (a reader copies, then checks
     * that plugins_seq did not change). */
    _Atomic uint32_t plugins_seq;
    spk_uplink_counters uplink;
    spk_hub_counters hub;           /* a hubd worker's slot */
    /* bytes proxied (stored by the proxy as they change, as is conns_total), then
     * metrics.h's hook stats and plugin metrics */
    _Atomic uint64_t bytes_from_client, bytes_from_server;
    spk_hookstats hooks;
    spk_pmetrics pm;
    spk_policy_counters policy;     /* the policy engine of this worker */
} spk_wslot;

typedef struct spk_status {
    uint32_t magic;
    uint32_t n_slots;
    spk_wslot slots[SPK_STATUS_SLOTS];
} spk_status;

#define SPK_STATUS_MAGIC 0x53504b31u /* "SPK1" */

/* Create the region (supervisor). Returns 0 and the memfd in *fd, the mapping in *out. */
int spk_status_create(spk_status **out, int *fd, spk_errbuf *eb);
/* Map a region created by the supervisor (worker). */
int spk_status_map(int fd, spk_status **out, spk_errbuf *eb);
void spk_status_unmap(spk_status *st);

/* CLOCK_MONOTONIC in milliseconds: the same clock in every process of the machine. */
uint64_t spk_mono_ms(void);

#endif
