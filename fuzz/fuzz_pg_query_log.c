/*
 * fuzz_pg_query_log.c -- the PostgreSQL decoder of plugins/pg-query-log.so on any stream.
 *
 * The harness is the plugin's host, through the ABI only: it dlopens the .so the build
 * made (as spoked's loader does), gives it a host table with the services the plugin
 * uses (log formats every line, as the host's does; config_get_size reads with the
 * config file's own size parser), and plays one connection per input: client chunks
 * to on_traffic_from_client, one-byte server answers (to an SSLRequest/GSSENCRequest) to
 * on_traffic_from_server, then on_close. Two instances run every input: the default
 * max_message (1 MiB) and max_message=16, so both the gathering and the skipping paths
 * of the reassembly see it; both must decode the same sessions (max_message limits what
 * is logged of a query, not whether a connection is followed).
 *
 * Input: a sequence of [ctl][bytes]: ctl's top bit set means "a server chunk of one byte,
 * the next byte"; else ctl & 0x7f is the client chunk's length (0x7f: the rest of the
 * input). The corpus (fuzz/corpus/pg_query_log) holds real client streams in this form.
 */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"
#include "units.h"

struct spoke_ctx {
    const char *max_message; /* the instance's config value, or NULL */
};

static spoke_ctx ctxs[2] = {{NULL}, {"16"}};

struct spoke_conn {
    uint64_t id;
    void *data[2]; /* conn_data, per instance */
    int instance;
};

static char log_line[4096];
static unsigned sessions[2]; /* "session" lines logged by each instance for this input */

/* "conn N: session user=..." (and not a query that happens to contain those words). */
static bool is_session_line(const char *line)
{
    if (strncmp(line, "conn ", 5) != 0)
        return false;
    line += 5 + strspn(line + 5, "0123456789");
    return strncmp(line, ": session user=", 15) == 0;
}

static void h_log(spoke_ctx *ctx, spoke_log_level level, const char *fmt, ...)
{
    (void)ctx, (void)level;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(log_line, sizeof(log_line), fmt, ap);
    va_end(ap);
    if (is_session_line(log_line))
        sessions[ctx == &ctxs[1]]++;
    if (getenv("SPOKE_FUZZ_VERBOSE"))
        fprintf(stderr, "pg-query-log: %s\n", log_line);
}

static const char *h_config_get(spoke_ctx *ctx, const char *key)
{
    return strcmp(key, "max_message") == 0 ? ctx->max_message : NULL;
}

static int h_config_get_size(spoke_ctx *ctx, const char *key, uint64_t *out)
{
    const char *v = h_config_get(ctx, key);
    if (v == NULL)
        return 0;
    return spk_parse_size(v, out) == 0 ? 0 : SPOKE_ERR_INVALID;
}

static uint64_t h_conn_id(const spoke_conn *conn)
{
    return conn ? conn->id : 0;
}

static void **h_conn_data(spoke_conn *conn, spoke_ctx *ctx)
{
    return conn && ctx ? &conn->data[conn->instance] : NULL;
}

static const spoke_host host = {
    .abi_major = SPOKE_ABI_MAJOR,
    .abi_minor = SPOKE_ABI_MINOR,
    .struct_size = sizeof(spoke_host),
    .log = h_log,
    .config_get = h_config_get,
    .conn_id = h_conn_id,
    .conn_data = h_conn_data,
    .config_get_size = h_config_get_size,
};

static const spoke_plugin *table;
static void *selves[2];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    void *so = dlopen(SPOKE_FUZZ_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    const spoke_plugin *(*entry)(const spoke_host *) =
        so ? (const spoke_plugin *(*)(const spoke_host *))dlsym(so, "spoke_plugin_v1") : NULL;
    if (entry == NULL || (table = entry(&host)) == NULL) {
        fprintf(stderr, "cannot load %s: %s\n", SPOKE_FUZZ_PLUGIN, dlerror());
        abort();
    }
    for (int i = 0; i < 2; i++) {
        spoke_init_args args = {
            .struct_size = sizeof(args), .role = SPOKE_ROLE_EDGE, .name = "pg-query-log"};
        if (table->init(&ctxs[i], &args, &selves[i]) != 0) {
            fprintf(stderr, "pg-query-log init failed: %s\n", log_line);
            abort();
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint64_t next_id;
    spoke_conn conn = {.id = ++next_id};
    sessions[0] = sessions[1] = 0;
    for (int i = 0; i < 2; i++) {
        conn.instance = i;
        size_t off = 0;
        while (off < size) {
            uint8_t ctl = data[off++];
            size_t len = ctl & 0x80 ? 1 : (ctl & 0x7f) == 0x7f ? size - off : (ctl & 0x7fu);
            if (len > size - off)
                len = size - off;
            /* A copy of exactly the chunk, so ASan sees a read past its end. */
            uint8_t *chunk = malloc(len ? len : 1);
            if (chunk == NULL)
                abort();
            memcpy(chunk, data + off, len);
            spoke_buf buf = {chunk, len};
            if (ctl & 0x80)
                table->on_traffic_from_server(selves[i], &conn, &buf);
            else
                table->on_traffic_from_client(selves[i], &conn, &buf);
            free(chunk);
            off += len;
        }
        table->on_close(selves[i], &conn);
    }
    /* max_message bounds what is logged of a Query or Parse, not whether the stream is
     * decoded: the startup message (at most 10000 bytes) is read whatever it is. */
    if (sessions[0] != sessions[1]) {
        fprintf(stderr, "max_message=16 logged %u session lines, the default %u\n", sessions[1],
                sessions[0]);
        abort();
    }
    return 0;
}
