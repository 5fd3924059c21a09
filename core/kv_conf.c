/*
 * kv_conf.c -- spk_config's kv.* keys onto spk_kv_opts (see kv_conf.h).
 */
#include "kv_conf.h"

#include <stdbool.h>

#include "kv.h"

int spk_kv_conf_open(const spk_config *cfg, spoke_role role, spk_kv **out, spk_errbuf *eb)
{
    *out = NULL;
    bool control = role == SPOKE_ROLE_CONTROL;
    const char *path = cfg != NULL ? (control ? cfg->hub_store : cfg->kv_path) : NULL;
    if (path == NULL)
        return spk_errf(eb, SPK_EINVAL, "no %s configured", control ? "hub.store" : "kv.path");
    spk_kv_opts o;
    spk_kv_opts_init(&o);
    uint64_t map = control ? cfg->hub_map_size : cfg->kv_map_size;
    if (map != 0)
        o.map_size = map;
    o.sync = control;
    return spk_kv_open(path, &o, out, eb);
}
