/*
 * kv_conf.h -- open the KV store with the config's kv.* keys.
 *
 * The one place that turns an spk_config into spk_kv_opts, so that every process that
 * opens the store for the KV host services opens it the same way: each spoked worker
 * (core/worker.c, through spk_host_kv_open) and each hubd worker.
 */
#ifndef SPK_KV_CONF_H
#define SPK_KV_CONF_H

#include "config.h"
#include "err.h"
#include "spoke.h"

struct spk_kv; /* kv.h */

/* Open the store at cfg->kv_path with map size cfg->kv_map_size. The edge role opens it
 * with opts.sync = false (its owner calls spk_kv_sync() every cfg->kv_sync_ms and before
 * closing); the control role with opts.sync = true, because hubd answers a batch only
 * after its commit (kv.h, DURABILITY). Call it in the process that will use the store,
 * after fork, once per process. On success *out is a store the caller closes with
 * spk_kv_close(). Errors: SPK_EINVAL (no kv.path), else spk_kv_open()'s codes (kv.h),
 * with the message in eb. */
int spk_kv_conf_open(const spk_config *cfg, spoke_role role, struct spk_kv **out, spk_errbuf *eb);

#endif
