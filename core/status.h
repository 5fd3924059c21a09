/*
 * status.h -- the shared-memory region where workers tell the supervisor what they do.
 *
 * The supervisor creates the region (a memfd, mapped shared) before starting any worker;
 * each worker maps it too and owns one slot. A worker writes, the supervisor reads:
 *
 *   act        which plugin and hook run now and a sequence number bumped on every hook
 *              entry (two relaxed stores and an increment per hook, see chain.c), and a
 *              heartbeat the worker's loop stamps every 100 ms. The supervisor samples them:
 *              the same (plugin, seq) seen for longer than hook_timeout is a slow hook.
 *   state      STARTING until the worker serves, then READY; DRAINING once asked to stop.
 *   plugins    the chain the worker loaded (name, version, quarantine key), written before
 *              the first init, so a crash in init is attributed like any other.
 *   reason     why a worker that could not start gave up (exit code SPK_EXIT_START).
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

#include "chain.h"

#define SPK_STATUS_SLOTS 128 /* workers of two generations, and the uplink */
#define SPK_STATUS_PLUGINS 64

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
} spk_plugin_info;

typedef struct spk_wslot {
    spk_slot act;
    _Atomic uint32_t state;
    _Atomic uint32_t n_plugins;     /* entries of plugins[] published */
    _Atomic uint32_t health_failed; /* chain index + 1 of the plugin whose health failed */
    _Atomic uint64_t conns_active;
    _Atomic uint64_t conns_total;
    spk_plugin_info plugins[SPK_STATUS_PLUGINS];
    char reason[1024];
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
