/*
 * t_units -- test plugin: init reads config `interval` with host->config_get_duration and
 * `limit` with host->config_get_size (ABI 1.1), and fails with the service's status when
 * either is malformed. Defaults (kept when a key is not set): 1234 ms, 5678 bytes.
 */
#include <inttypes.h>

#include "spoke.h"

static const spoke_host *host;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    if (!SPOKE_HOST_HAS(host, config_get_duration) || !SPOKE_HOST_HAS(host, config_get_size))
        return SPOKE_ERR_UNSUPPORTED;
    uint64_t ms = 1234, bytes = 5678;
    int rc = host->config_get_duration(ctx, "interval", &ms);
    if (rc != 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "t_units: interval: %s", host->strerror(rc));
        return rc;
    }
    rc = host->config_get_size(ctx, "limit", &bytes);
    if (rc != 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "t_units: limit: %s", host->strerror(rc));
        return rc;
    }
    host->log(ctx, SPOKE_LOG_INFO, "t_units: interval=%" PRIu64 "ms limit=%" PRIu64 "B", ms, bytes);
    return 0;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-units",
    .version = "1.0.0",
    .init = init,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
