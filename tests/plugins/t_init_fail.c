/*
 * t_init_fail -- test plugin: init logs "t_init_fail: refusing to start" and fails with
 * SPOKE_ERR_INVALID. The host must refuse the plugin and say its init failed.
 */
#include "spoke.h"

static const spoke_host *host;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    host->log(ctx, SPOKE_LOG_ERROR, "t_init_fail: refusing to start");
    return SPOKE_ERR_INVALID;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-init-fail",
    .version = "1.0.0",
    .init = init,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
