/*
 * t_requires -- test plugin: requires "passthrough>=2.0", which the passthrough example
 * (1.0.0) does not satisfy. Refused under compatibility: strict, loaded with a warning
 * under loose.
 */
#include "spoke.h"

static const spoke_host *host;

static const char *const requirements[] = {"passthrough>=2.0", NULL};

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-requires",
    .version = "1.0.0",
    .dependencies = requirements,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
