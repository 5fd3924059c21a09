/*
 * t_abi_major -- test plugin: a table from a future ABI major (SPOKE_ABI_MAJOR + 1).
 * The host must refuse it with a message naming both versions ("plugin ABI 2.0, host
 * ABI 1.1"), before reading anything past the three version fields.
 */
#include "spoke.h"

static const spoke_host *host;

static const spoke_plugin plugin = {
    .abi_major = SPOKE_ABI_MAJOR + 1,
    .abi_minor = 0,
    .struct_size = (uint32_t)sizeof(spoke_plugin),
    .name = "t-abi-major",
    .version = "1.0.0",
};

SPOKE_PLUGIN_ENTRY(plugin, host)
