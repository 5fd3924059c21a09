/*
 * kv_conf.c -- spk_config's kv.* keys onto spk_kv_opts (see kv_conf.h).
 */
#include "kv_conf.h"

#include "kv.h"

int spk_kv_conf_open(const spk_config *cfg, spoke_role role, spk_kv **out, spk_errbuf *eb)
{
    *out = NULL;
    if (cfg == NULL || cfg->kv_path == NULL)
        return spk_errf(eb, SPK_EINVAL, "no kv.path configured");
    spk_kv_opts o;
    spk_kv_opts_init(&o);
    if (cfg->kv_map_size != 0)
        o.map_size = cfg->kv_map_size;
    o.sync = role == SPOKE_ROLE_CONTROL;
    return spk_kv_open(cfg->kv_path, &o, out, eb);
}
