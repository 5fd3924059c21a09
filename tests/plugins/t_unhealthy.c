/*
 * t_unhealthy -- test plugin "t-unhealthy": its health check fails every time.
 */
#include "spoke.h"

static const spoke_host *host;

static int health(void *self)
{
    (void)self;
    return -1;
}

static const spoke_plugin t_unhealthy = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-unhealthy",
    .version = "1.0.0",
    .health = health,
};

SPOKE_PLUGIN_ENTRY(t_unhealthy, host)
