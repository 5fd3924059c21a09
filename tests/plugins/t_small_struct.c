/*
 * t_small_struct -- test plugin: struct_size 8 covers only the version fields, not even
 * name and version. The host must refuse it (and must not read name, although it is set).
 */
#include "spoke.h"

static const spoke_host *host;

static const spoke_plugin plugin = {
    .abi_major = SPOKE_ABI_MAJOR,
    .abi_minor = SPOKE_ABI_MINOR,
    .struct_size = 8,
    .name = "t-small-struct",
    .version = "1.0.0",
};

SPOKE_PLUGIN_ENTRY(plugin, host)
