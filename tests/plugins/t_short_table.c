/*
 * t_short_table -- test plugin: a valid plugin whose table is a prefix of the 1.0 table,
 * as an older plugin's would be. Its own struct matches spoke_plugin up to and including
 * on_traffic_from_client; the next field holds garbage, and struct_size stops right
 * before it. A host that honours struct_size never reads (or calls) the garbage: it sees
 * on_traffic_to_server and everything after as NULL.
 */
#include <stddef.h>

#include "spoke.h"

typedef struct short_table {
    uint16_t abi_major;
    uint16_t abi_minor;
    uint32_t struct_size;
    const char *name;
    const char *version;
    const char *description;
    const char *const *dependencies;
    int (*init)(spoke_ctx *ctx, const spoke_init_args *args, void **self);
    void (*fini)(void *self);
    int (*health)(void *self);
    void (*on_config_loaded)(void *self);
    spoke_verdict (*on_open)(void *self, spoke_conn *conn);
    void (*on_close)(void *self, spoke_conn *conn);
    spoke_traffic_hook on_traffic_from_client;
    void *garbage; /* where on_traffic_to_server would be: never to be read */
} short_table;

_Static_assert(offsetof(short_table, on_traffic_from_client) ==
                   offsetof(spoke_plugin, on_traffic_from_client),
               "short_table must match the prefix of spoke_plugin");
_Static_assert(offsetof(short_table, garbage) == offsetof(spoke_plugin, on_traffic_to_server),
               "garbage must sit where on_traffic_to_server is");

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    (void)conn;
    (void)buf;
    return SPOKE_CONTINUE;
}

static const short_table table = {
    .abi_major = SPOKE_ABI_MAJOR,
    .abi_minor = 0,
    .struct_size = (uint32_t)offsetof(short_table, garbage),
    .name = "t-short-table",
    .version = "1.0.0",
    .description = "a 1.0 prefix table followed by garbage",
    .on_traffic_from_client = from_client,
    .garbage = (void *)0x1,
};

/* Written by hand: SPOKE_PLUGIN_ENTRY would return a spoke_plugin, and this table is
 * deliberately shorter. The host copies only struct_size bytes of it. */
SPOKE_EXPORT const spoke_plugin *spoke_plugin_v1(const spoke_host *host);
SPOKE_EXPORT const spoke_plugin *spoke_plugin_v1(const spoke_host *host)
{
    (void)host;
    return (const spoke_plugin *)(const void *)&table;
}
