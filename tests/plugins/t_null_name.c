/*
 * t_null_name -- test plugin: a table without a name. Refused ("name is missing").
 */
#include "spoke.h"

static const spoke_host *host;

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = NULL,
    .version = "1.0.0",
};

SPOKE_PLUGIN_ENTRY(plugin, host)
