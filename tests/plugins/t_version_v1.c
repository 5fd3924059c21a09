/*
 * t_version_v1 -- test plugin "t-version" 1.0.0: answers a client chunk "VERSION?" with
 * "t-version <version>\n" (SPOKE_RESPOND); passes everything else. t_version_v2.c builds
 * the same plugin as 2.0.0, for the hot reload tests.
 */
#include <stdio.h>
#include <string.h>

#include "spoke.h"

#ifndef T_VERSION
#define T_VERSION "1.0.0"
#endif

static const spoke_host *host;

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    if (buf->len >= 8 && memcmp(buf->data, "VERSION?", 8) == 0) {
        static const char answer[] = "t-version " T_VERSION "\n";
        return host->respond(conn, answer, sizeof(answer) - 1) == 0 ? SPOKE_RESPOND
                                                                     : SPOKE_CLOSE;
    }
    return SPOKE_CONTINUE;
}

static const spoke_plugin t_version = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-version",
    .version = T_VERSION,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(t_version, host)
