/*
 * t_dup_a -- test plugin: one of two different files (t_dup_a, t_dup_b) that both call
 * themselves "t-dup". Loading both must be refused: plugin names are unique in a host.
 */
#include "spoke.h"

static const spoke_host *host;

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-dup",
    .version = "1.0.0",
    .description = "duplicate name, file a",
};

SPOKE_PLUGIN_ENTRY(plugin, host)
