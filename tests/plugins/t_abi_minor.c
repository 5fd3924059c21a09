/*
 * t_abi_minor -- test plugin: a table from a newer minor of the same major
 * (SPOKE_ABI_MINOR + 1). It may rely on host services this host lacks: refused.
 */
#include "spoke.h"

static const spoke_host *host;

static const spoke_plugin plugin = {
    .abi_major = SPOKE_ABI_MAJOR,
    .abi_minor = SPOKE_ABI_MINOR + 1,
    .struct_size = (uint32_t)sizeof(spoke_plugin),
    .name = "t-abi-minor",
    .version = "1.0.0",
};

SPOKE_PLUGIN_ENTRY(plugin, host)
