/*
 * kv_conf.h -- open the KV store with the config's kv.* keys.
 *
 * The one place that turns an spk_config into spk_kv_opts, so that every process that
 * opens the store for the KV host services opens it the same way: each spoked worker
 * (core/worker.c, through spk_host_kv_open), each hubd worker (core/hub.c: the store of
 * its dedupe marks, edges and plugins' KV) and hubd's status and `hubd kv` readers.
 */
#ifndef SPK_KV_CONF_H
#define SPK_KV_CONF_H

#include "config.h"
#include "err.h"
#include "spoke.h"

struct spk_kv; /* kv.h */

/* Open the role's store: the edge's at cfg->kv_path with map size cfg->kv_map_size, the
 * control role's at cfg->hub_store with cfg->hub_map_size. The edge role opens it
 * with opts.sync = false (its owner calls spk_kv_sync() every cfg->kv_sync_ms and before
 * closing); the control role with opts.sync = true, because hubd answers a batch only
 * after its commit (kv.h, DURABILITY). Call it in the process that will use the store,
 * after fork, once per process. On success *out is a store the caller closes with
 * spk_kv_close(). Errors: SPK_EINVAL (no kv.path / hub.store), else spk_kv_open()'s codes (kv.h),
 * with the message in eb. */
int spk_kv_conf_open(const spk_config *cfg, spoke_role role, struct spk_kv **out, spk_errbuf *eb);

#endif
