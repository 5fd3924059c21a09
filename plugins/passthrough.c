/*
 * passthrough -- the smallest useful plugin: it implements every traffic hook and changes
 * nothing. It is the baseline of `spoke-bench hooks` (the cost of one hook call) and a
 * template to start a plugin from.
 */
#include "spoke.h"

static const spoke_host *host;

static spoke_verdict pass(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    (void)conn;
    (void)buf;
    return SPOKE_CONTINUE;
}

static const spoke_plugin passthrough = {
    SPOKE_PLUGIN_HEADER,
    .name = "passthrough",
    .version = "1.0.0",
    .description = "forwards traffic unchanged",
    .on_traffic_from_client = pass,
    .on_traffic_to_server = pass,
    .on_traffic_from_server = pass,
    .on_traffic_to_client = pass,
};

SPOKE_PLUGIN_ENTRY(passthrough, host)
