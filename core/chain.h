/*
 * chain.h -- the plugin chain: runs the hooks of the loaded plugins, in config order, on
 * a connection's traffic, and merges their verdicts.
 *
 * spk_chain_build() turns a plugin set into one compact array per hook holding only the
 * plugins that implement it, so a hook nobody implements costs one compare, and each
 * call is one indirect call between spk_slot_enter() and spk_slot_leave() on the worker's
 * watchdog slot (slot.h: so the supervisor can tell which plugin and hook a worker died or
 * hung in).
 *
 * Merging (see spoke_verdict in spoke.h): CONTINUE and MODIFIED go on to the next plugin,
 * which sees the rewritten buffer; the first RESPOND or CLOSE stops the chain and is the
 * result; an unknown value counts as CLOSE. A "terminate" signal raised during the chain
 * turns the result into CLOSE (after the queued response is sent).
 */
#ifndef SPK_CHAIN_H
#define SPK_CHAIN_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader.h"
#include "slot.h"
#include "spoke.h"

/* The host's buffer: the public view first, then the storage the host owns. */
typedef struct spk_buf {
    spoke_buf pub;
    uint8_t *own; /* owned storage once a plugin rewrote the chunk; NULL before */
    size_t cap;
} spk_buf;

/* Bytes a plugin queued with host->respond(). */
typedef struct spk_bytes {
    uint8_t *data;
    size_t len;
    size_t cap;
} spk_bytes;

int spk_bytes_append(spk_bytes *b, const void *data, size_t len);
void spk_bytes_free(spk_bytes *b);

#define SPK_CONN_TERMINATE 0x1u

/* The host's side of spoke_conn. The proxy embeds it in its own connection. */
struct spoke_conn {
    uint64_t id;
    char peer[64];
    void **pdata;        /* one slot per plugin of the chain (conn_data) */
    spk_bytes reply;     /* what respond() queued during the current chain run */
    int reply_to_server; /* 0: reply goes to the client; 1: to the server */
    unsigned flags;      /* SPK_CONN_* */
};

typedef struct spk_chain_entry {
    spoke_traffic_hook fn;
    void *self;
    uint32_t index;   /* chain index of the plugin */
    spk_hookstat *st; /* where this plugin's calls of this hook count (metrics.h) */
    uint64_t mask;    /* its time-sampling mask */
} spk_chain_entry;

typedef struct spk_chain {
    spk_plugin *const *plugins; /* borrowed from the set */
    size_t n_plugins;
    spk_chain_entry *traffic[4]; /* per SPK_HOOK_FROM_CLIENT..TO_CLIENT */
    size_t n_traffic[4];
    bool any_half_close;         /* a plugin implements on_half_close */
    spk_slot *slot;              /* never NULL after build: a private slot by default */
    spk_slot own_slot;
    struct spk_policy *policy;   /* the worker's policies (policy.h; borrowed), for the
                                    host's own "open" signal; NULL: none */
} spk_chain;

/* Build the chain over `set` (borrowed; it must outlive the chain), after
 * spk_plugin_set_init() (the chain caches each plugin's self and where its hooks count,
 * spk_plugin_set_stats). Returns 0 or SPK_ENOMEM. */
int spk_chain_build(spk_chain *ch, const spk_plugin_set *set);
void spk_chain_free(spk_chain *ch);

/* Publish hook activity in `slot` (e.g. the shared-memory slot of this worker). */
void spk_chain_set_slot(spk_chain *ch, spk_slot *slot);

/* Per-connection state: allocate conn->pdata for the chain. Returns 0 or SPK_ENOMEM. */
int spk_chain_conn_init(const spk_chain *ch, spoke_conn *conn, uint64_t id, const char *peer);
/* Release what spk_chain_conn_init allocated (not the plugins' data: on_close frees that). */
void spk_chain_conn_fini(spoke_conn *conn);

/* Run one traffic hook over every plugin implementing it. `buf` starts as the bytes read;
 * on return buf->pub holds what should be forwarded (for CONTINUE/MODIFIED). */
spoke_verdict spk_chain_run(const spk_chain *ch, enum spk_hook_id hook, spoke_conn *conn,
                            spk_buf *buf);

/* Run on_open of every plugin; CONTINUE, RESPOND or CLOSE merged as above. With
 * ch->policy set, the host's "open" signal goes to the policies first (policy.h,
 * spk_policy_open), and a policy that terminates or closes the connection refuses it
 * before any plugin's on_open runs. */
spoke_verdict spk_chain_open(const spk_chain *ch, spoke_conn *conn);
/* Run on_close of every plugin (all of them, in order). */
void spk_chain_close(const spk_chain *ch, spoke_conn *conn);
/* Run on_half_close of every plugin implementing it (spoke.h), for the client's
 * half-close (from_client) or the server's. `buf` starts as the caller made it (empty);
 * on return buf->pub holds what should be sent before the FIN (for CONTINUE/MODIFIED).
 * Merged as spk_chain_run merges. */
spoke_verdict spk_chain_half_close(const spk_chain *ch, spoke_conn *conn, bool from_client,
                                   spk_buf *buf);
/* Run on_tick of every plugin. */
void spk_chain_tick(const spk_chain *ch);

/* Reset buf to view `data[0..len)` without owning it (keeps any owned storage for reuse). */
static inline void spk_buf_view(spk_buf *buf, const uint8_t *data, size_t len)
{
    buf->pub.data = data;
    buf->pub.len = len;
}
void spk_buf_free(spk_buf *buf);

#endif
