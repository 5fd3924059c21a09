/*
 * spoke.h -- the spoke plugin ABI. This header is the only thing a plugin author needs.
 *
 * A plugin is a shared object that exports one function:
 *
 *     const spoke_plugin *spoke_plugin_v1(const spoke_host *host);
 *
 * The host dlopen()s the file, calls that function once, checks the table it returns and
 * from then on calls the hooks in it directly, in-process. `host` is the table of services
 * the host offers (logging, timers, config lookup, edge identity, buffer and connection
 * accessors, send_to_control ...). Keep the pointer: it stays valid until fini returns.
 *
 * LIFECYCLE
 *
 *  spoke_plugin_v1 is called once per load, then init once. fini is called once for a
 *  plugin whose init returned 0 (or that has no init), and never for a plugin whose init
 *  failed: init must release what it allocated before it returns an error (timers from
 *  every() are stopped by the host either way). When a later plugin's init fails, the
 *  plugins initialised before it get their fini, in reverse order, and the set is not
 *  used: on_config_loaded runs only after every init succeeded. A crash or a hang in
 *  init ends the worker process, so nothing runs after it (the supervisor blames the
 *  plugin). Otherwise fini runs when the worker unloads the plugin as it stops (SIGTERM,
 *  SIGQUIT, an old generation ending after a reload); a worker that crashes or that the
 *  watchdog kills runs no fini at all.
 *
 * ABI RULES
 *
 *  1. Both tables (spoke_plugin, spoke_host) begin with abi_major, abi_minor and
 *     struct_size. These three fields never move and are checked before anything else.
 *  2. A host refuses a plugin whose abi_major differs from its own, and a plugin whose
 *     abi_minor is newer than its own (the plugin may rely on services this host lacks).
 *     The refusal names both versions.
 *  3. Within one major, tables only grow at the end. A field is never removed, reordered,
 *     or changed in type or meaning. Each new field bumps abi_minor.
 *  4. The host reads struct_size before touching any field: it copies at most struct_size
 *     bytes of the plugin's table into a zeroed table of its own, so a field the plugin
 *     did not know about reads as NULL/0. A plugin does the same with the host table:
 *     use SPOKE_HOST_HAS(host, field) before calling a service newer than 1.0. A service
 *     a role does not offer is NULL in the table that role's host passes (its field says
 *     "edge role only"), never a function that fails: SPOKE_HOST_HAS tells a plugin both
 *     "not offered by this host" and "not offered in this role".
 *  5. Enumerations only gain values. A plugin must treat an unknown value it receives as
 *     the neutral case; the host treats an unknown verdict as SPOKE_CLOSE.
 *  6. Strings crossing the ABI are NUL-terminated UTF-8. Pointers the host passes to a hook
 *     are borrowed for the duration of that call unless their field says otherwise. Every
 *     service that returns a string says at its declaration how long the string lives;
 *     the plugin never frees one.
 *  7. Names: `spoke_` for everything public. Every function pointer in spoke_plugin is a
 *     hook (the host calls the plugin) and every function pointer in spoke_host is a
 *     service (the plugin calls the host). Hooks that answer an event are named
 *     `on_<event>`; the lifecycle hooks (init, fini, health) and the control hook
 *     (accept_edge_payload) keep their 1.0 names. No service starts with `on_`.
 *
 * THREADING AND PROCESSES
 *
 *  A worker process runs one event loop on one thread. Every hook and every timer
 *  callback of a plugin is called on that thread, never concurrently with another hook
 *  of the same worker. Several worker processes may each load the plugin, so state that
 *  must be shared between workers belongs in the KV store or the control plane, not in
 *  a static variable. A hook must not block: the host's watchdog counts a hook that runs
 *  past plugins.hook_timeout and kills the worker past ten times that.
 *
 * CHANGELOG (one line per symbol, as Varnish's vrt.h keeps it)
 *
 *  1.0  first version:
 *       SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR, SPOKE_ENTRY_SYMBOL, SPOKE_EXPORT, SPOKE_PRINTF
 *       spoke_status: SPOKE_OK, SPOKE_ERR_INVALID, _NOMEM, _UNSUPPORTED,
 *         _PAYLOAD_TOO_LARGE, _TOO_MANY_METADATA, _METADATA_KEY_TOO_LONG,
 *         _METADATA_VALUE_TOO_LONG, _CORRELATION_ID_TOO_LONG, _QUEUE_FULL,
 *         _QUEUE_UNAVAILABLE, _NOT_JSON
 *       SPOKE_MAX_PAYLOAD, SPOKE_MAX_METADATA, SPOKE_MAX_METADATA_KEY,
 *         SPOKE_MAX_METADATA_VALUE, SPOKE_MAX_CORRELATION_ID
 *       spoke_verdict: SPOKE_CONTINUE, SPOKE_MODIFIED, SPOKE_RESPOND, SPOKE_CLOSE
 *       spoke_log_level: SPOKE_LOG_DEBUG, _INFO, _WARN, _ERROR
 *       spoke_role: SPOKE_ROLE_EDGE, SPOKE_ROLE_CONTROL
 *       spoke_kv, spoke_ctx, spoke_conn, spoke_buf, spoke_init_args, spoke_edge_payload,
 *         spoke_traffic_hook, spoke_timer_cb
 *       spoke_plugin: abi_major, abi_minor, struct_size, name, version, description,
 *         requires, init, fini, health, on_config_loaded, on_open, on_close,
 *         on_traffic_from_client, on_traffic_to_server, on_traffic_from_server,
 *         on_traffic_to_client, on_tick, accept_edge_payload
 *       spoke_host: abi_major, abi_minor, struct_size, log, config_get, edge_id,
 *         edge_namespace, every, timer_cancel, buf_set, buf_resize, conn_id, conn_peer,
 *         conn_data, respond, signal, send_to_control, send_to_control_json, strerror
 *       SPOKE_PLUGIN_HEADER, SPOKE_HOST_HAS, SPOKE_PLUGIN_ENTRY
 *  1.1  spoke_plugin.requires renamed spoke_plugin.dependencies (same place and type, so
 *         1.0 binaries are unaffected; `requires` is a C++20 keyword)
 *       spoke_host.config_get_duration added
 *       spoke_host.config_get_size added
 *       spoke_host: in the control role, the edge-only services are NULL (rule 4);
 *         1.0 hosts answered SPOKE_ERR_UNSUPPORTED from send_to_control instead
 *       the lifetime of every string a service returns, and fini after a failed init
 *         (never), are stated; no behaviour changed
 *  1.2  spoke_status: SPOKE_ERR_NOT_FOUND (-18) added
 *       spoke_status: SPOKE_ERR_KV_UNAVAILABLE (-19) added
 *       SPOKE_KV_MAX_KEY added
 *       SPOKE_KV_MAX_VALUE added
 *       spoke_kv_scan_cb added
 *       spoke_host.kv_get added
 *       spoke_host.kv_put added
 *       spoke_host.kv_del added
 *       spoke_host.kv_scan added
 *  1.3  spoke_plugin.on_half_close added
 *  1.4  spoke_metric_type: SPOKE_METRIC_COUNTER, _GAUGE, _HISTOGRAM added
 *       spoke_metric added
 *       spoke_host.metric_register added
 *       spoke_host.metric_series added
 *       spoke_host.metric_add added
 *       spoke_host.metric_set added
 *       spoke_host.metric_observe added
 */
#ifndef SPOKE_H
#define SPOKE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPOKE_ABI_MAJOR 1
#define SPOKE_ABI_MINOR 4

/* The symbol the host looks up in the plugin. */
#define SPOKE_ENTRY_SYMBOL "spoke_plugin_v1"

#if defined(__GNUC__)
#define SPOKE_EXPORT __attribute__((visibility("default")))
#define SPOKE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define SPOKE_EXPORT
#define SPOKE_PRINTF(f, a)
#endif

/* ---------------------------------------------------------------------------------------
 * Status codes. Host services return 0 on success or one of these negative codes;
 * host->strerror() names each one. Codes are stable across minors.
 * ------------------------------------------------------------------------------------- */
typedef enum spoke_status {
    SPOKE_OK = 0,
    SPOKE_ERR_INVALID = -1,            /* an argument is NULL, empty or out of range */
    SPOKE_ERR_NOMEM = -2,              /* an allocation failed */
    SPOKE_ERR_UNSUPPORTED = -3,        /* not possible in this state (e.g. every() where the
                                          host runs no loop); a service a role does not
                                          offer is NULL instead (rule 4) */
    SPOKE_ERR_PAYLOAD_TOO_LARGE = -10, /* payload over 1 MiB */
    SPOKE_ERR_TOO_MANY_METADATA = -11, /* more than 50 metadata entries */
    SPOKE_ERR_METADATA_KEY_TOO_LONG = -12,   /* a metadata key over 256 bytes */
    SPOKE_ERR_METADATA_VALUE_TOO_LONG = -13, /* a metadata value over 4096 bytes */
    SPOKE_ERR_CORRELATION_ID_TOO_LONG = -14, /* correlation ID over 256 bytes */
    SPOKE_ERR_QUEUE_FULL = -15,        /* queue.max_pending or queue.max_bytes reached */
    SPOKE_ERR_QUEUE_UNAVAILABLE = -16, /* disk or map full, or the queue cannot be opened */
    SPOKE_ERR_NOT_JSON = -17,          /* send_to_control_json: text is not well-formed JSON */
    /* 1.2 */
    SPOKE_ERR_NOT_FOUND = -18,         /* kv_get/kv_del: no such key */
    SPOKE_ERR_KV_UNAVAILABLE = -19,    /* the KV store is not configured, cannot be opened,
                                          is full (map or disk) or failed */
} spoke_status;

/* Payload limits of send_to_control(), enforced by edge and control alike. A value equal
 * to a limit is accepted; one byte more is refused. */
#define SPOKE_MAX_PAYLOAD (1024u * 1024u)
#define SPOKE_MAX_METADATA 50u
#define SPOKE_MAX_METADATA_KEY 256u
#define SPOKE_MAX_METADATA_VALUE 4096u
#define SPOKE_MAX_CORRELATION_ID 256u

/* Limits of the KV services (1.2): a key is 0 to SPOKE_KV_MAX_KEY bytes (LMDB's 511-byte
 * key limit less the host's 4-byte namespace prefix), a value 0 to SPOKE_KV_MAX_VALUE.
 * A length equal to a limit is accepted; one byte more is refused. */
#define SPOKE_KV_MAX_KEY 507u
#define SPOKE_KV_MAX_VALUE (1024u * 1024u)

/* ---------------------------------------------------------------------------------------
 * Verdicts. Every traffic hook (and on_open) returns one. Plugins run in config order;
 * the host merges verdicts as follows:
 *   SPOKE_CONTINUE  nothing changed; the next plugin runs.
 *   SPOKE_MODIFIED  the plugin rewrote the buffer (through buf_set/buf_resize); the next
 *                   plugin runs and sees the rewrite.
 *   SPOKE_RESPOND   stop: later plugins do not run and the chunk is not forwarded. What the
 *                   plugin queued with host->respond() goes back to the peer it came from.
 *   SPOKE_CLOSE     stop: later plugins do not run, the chunk is dropped and the
 *                   connection is closed (after what respond() queued has been sent).
 * The first stopping verdict wins. An unknown value is treated as SPOKE_CLOSE.
 * ------------------------------------------------------------------------------------- */
typedef enum spoke_verdict {
    SPOKE_CONTINUE = 0,
    SPOKE_MODIFIED = 1,
    SPOKE_RESPOND = 2,
    SPOKE_CLOSE = 3,
} spoke_verdict;

typedef enum spoke_log_level {
    SPOKE_LOG_DEBUG = 0,
    SPOKE_LOG_INFO = 1,
    SPOKE_LOG_WARN = 2,
    SPOKE_LOG_ERROR = 3,
} spoke_log_level;

/* Where the host runs the plugin: the edge (spoked) or the control plane (hubd). */
typedef enum spoke_role {
    SPOKE_ROLE_EDGE = 0,
    SPOKE_ROLE_CONTROL = 1,
} spoke_role;

/* A key/value pair of NUL-terminated strings (metadata, config, signal fields). */
typedef struct spoke_kv {
    const char *key;
    const char *value;
} spoke_kv;

/* The host's handle for one loaded plugin. Opaque; pass it to host services that act
 * on behalf of the plugin (log, timers, config, send_to_control). Valid from init until
 * fini returns. */
typedef struct spoke_ctx spoke_ctx;

/* One proxied connection. Opaque; valid for the duration of a hook call, and from
 * on_open until on_close returns. */
typedef struct spoke_conn spoke_conn;

/* A chunk of traffic. The host owns the memory. `data` and `len` may be read directly
 * and are valid for the duration of the hook call; they are read-only. To rewrite the
 * chunk, call host->buf_set() or host->buf_resize() and return SPOKE_MODIFIED. The
 * host's struct continues past these two fields. */
typedef struct spoke_buf {
    const uint8_t *data;
    size_t len;
} spoke_buf;

/* What init receives. Every pointer is borrowed until init returns: copy what you keep.
 * Check struct_size before reading a field added after 1.0. */
typedef struct spoke_init_args {
    uint32_t struct_size;
    uint32_t plugin_id;           /* the configured numeric ID; 0 when none was given */
    spoke_role role;
    const char *name;             /* the configured (unique) name of this plugin */
    const char *const *args;      /* `args:` from the config, as given */
    size_t n_args;
    const char *const *env;       /* `env:` from the config, "KEY=value" strings, as given */
    size_t n_env;
    const spoke_kv *config;       /* the `config:` map, flattened: nested keys joined by '.',
                                     list items by index ("a.b", "list.0"), values as text */
    size_t n_config;
} spoke_init_args;

/* What accept_edge_payload receives (control role). Borrowed for the call. */
typedef struct spoke_edge_payload {
    uint32_t struct_size;
    uint32_t plugin_id;
    const uint8_t *payload;
    size_t payload_len;
    const char *edge_id;
    const char *edge_namespace;
    const char *correlation_id;   /* "" when none */
    const char *content_type;     /* "" for raw bytes, "application/json" from the JSON call */
    const spoke_kv *metadata;
    size_t n_metadata;
    int64_t edge_timestamp_ms;    /* Unix time in ms when the edge accepted the payload */
    int64_t received_timestamp_ms;/* Unix time in ms when the control plane received it */
    uint64_t sequence;            /* per-edge, monotonic; (edge_id, sequence) is unique */
} spoke_edge_payload;

typedef struct spoke_host spoke_host;

/* 1.4: the kinds of metric a plugin registers (host->metric_register). */
typedef enum spoke_metric_type {
    SPOKE_METRIC_COUNTER = 0,   /* only goes up; the name must end in _total */
    SPOKE_METRIC_GAUGE = 1,     /* goes up and down */
    SPOKE_METRIC_HISTOGRAM = 2, /* observations counted in buckets, with their sum */
} spoke_metric_type;

/* 1.4: one series of a metric (a metric with one set of label values). Opaque; from
 * host->metric_series, valid until fini returns. */
typedef struct spoke_metric spoke_metric;

/* Hook types. `self` is whatever init stored in *self (NULL if it stored nothing). */
typedef spoke_verdict (*spoke_traffic_hook)(void *self, spoke_conn *conn, spoke_buf *buf);
typedef void (*spoke_timer_cb)(void *self, void *arg);

/* 1.2: called by host->kv_scan() for each key in order, with the key (without any
 * namespace) and its value; both are the host's and valid only until the callback
 * returns. Return 0 to go on, > 0 to stop the scan (kv_scan then returns 0), < 0 to stop
 * it and have kv_scan return that value. It must not call any KV service (they answer
 * SPOKE_ERR_UNSUPPORTED while a scan runs). */
typedef int (*spoke_kv_scan_cb)(void *arg, const void *key, size_t klen, const void *val,
                                size_t vlen);

/* ---------------------------------------------------------------------------------------
 * The plugin table. Return a pointer to a static, constant instance from spoke_plugin_v1.
 * Every hook is optional (NULL = not implemented, and it costs nothing at run time).
 * ------------------------------------------------------------------------------------- */
typedef struct spoke_plugin {
    /* Must be first; they protect the rest. Set them to SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR
     * and sizeof(spoke_plugin), or use SPOKE_PLUGIN_HEADER. */
    uint16_t abi_major;
    uint16_t abi_minor;
    uint32_t struct_size;

    const char *name;        /* required; unique within a host. Convention: lowercase,
                                [a-z0-9-], a common vendor prefix ("acme-cache") */
    const char *version;     /* required; "MAJOR.MINOR.PATCH" */
    const char *description; /* optional, one line */
    /* Optional NULL-terminated list of requirements on other plugins loaded in the same
     * host: "name", "name>=1.2", "name=1.2.3"; operators = == != > >= < <=. What a missing
     * plugin or a wrong version does is decided by plugins.compatibility (strict: refuse
     * this plugin; loose: log a warning and load it). Called `requires` in 1.0. */
    const char *const *dependencies;

    /* Called once after loading, before any other hook. Return 0, or a negative code
     * (the host refuses the plugin and logs the code's name). Store per-plugin state in
     * *self; it is passed to every hook. `ctx` is this plugin's handle for host services;
     * keep it. Runs with plugins.start_timeout as its limit. After an error return fini
     * is NOT called (see LIFECYCLE): free what you allocated before returning it. */
    int (*init)(spoke_ctx *ctx, const spoke_init_args *args, void **self);
    /* Called once before unloading, only when init returned 0 (or there is no init).
     * Free what init allocated. Host services may still be called from fini. */
    void (*fini)(void *self);
    /* Called every plugins.health_check_period. Return 0 when healthy; a non-zero value
     * plugins.health_fail_limit times in a row counts as a crash of the plugin. */
    int (*health)(void *self);
    /* Called once when every configured plugin is initialised, before traffic flows. */
    void (*on_config_loaded)(void *self);

    /* Edge hooks. on_open runs when a client connects, before the upstream is contacted
     * (with listen.upstream_connect: lazy; with eager the connect starts right after).
     * SPOKE_CLOSE refuses the connection (after sending what respond() queued).
     * SPOKE_RESPOND sends what respond() queued and keeps the connection (a greeting);
     * either stops the on_open chain: later plugins' on_open does not run. */
    spoke_verdict (*on_open)(void *self, spoke_conn *conn);
    /* Runs once for every plugin on every connection, when it closes, even for plugins
     * whose on_open did not run (an earlier plugin stopped the on_open chain): free what
     * conn_data points to here. */
    void (*on_close)(void *self, spoke_conn *conn);
    /* Bytes read from the client, before any forwarding decision. */
    spoke_traffic_hook on_traffic_from_client;
    /* The same bytes after every from_client hook ran, just before they go upstream. */
    spoke_traffic_hook on_traffic_to_server;
    /* Bytes read from the upstream server. */
    spoke_traffic_hook on_traffic_from_server;
    /* The same bytes after every from_server hook ran, just before they go to the client. */
    spoke_traffic_hook on_traffic_to_client;
    /* Called every plugins.tick (default 1s) on the worker's loop. */
    void (*on_tick)(void *self);

    /* Control hook (hubd). Called for each payload whose plugin ID matches this
     * plugin's. Set *handled = 1 when the payload was for this plugin (it is then not
     * offered to others), 0 to pass it on. Return 0, or a negative code to report a
     * processing error (logged and counted; the payload is never redelivered). */
    int (*accept_edge_payload)(void *self, const spoke_edge_payload *payload, int *handled);

    /* ---- 1.3 ---- */

    /* Edge hook. The client (from_client = 1) or the server (0) half-closed: it will send
     * no more bytes (its FIN arrived), though it may still read. This is the moment to
     * hand on what the plugin held back from earlier chunks (a message kept until its
     * delimiter, say), or it would be lost: put those bytes in `buf` with buf_set or
     * buf_resize and return SPOKE_MODIFIED, and they go on in the direction of that
     * side's traffic (to the server for the client's half-close), ahead of the FIN.
     * Called once per direction, for each plugin implementing it, in config order: `buf`
     * starts empty, and a plugin sees what earlier ones put in it (it may add its own
     * bytes after them, or rewrite them). What it holds is sent as it is: it does not run
     * through the traffic hooks again. respond() queues bytes for the side that
     * half-closed. Verdicts as for a traffic hook: CONTINUE and MODIFIED go on to the next
     * plugin, then `buf` and the FIN are sent; RESPOND stops the chain, drops `buf`, sends
     * what respond() queued and still passes the FIN on; CLOSE drops `buf` and closes the
     * connection once what respond() queued is sent. Not called when a connection ends
     * without a half-close (a reset, a CLOSE verdict, the drain deadline): on_close
     * follows either way. */
    spoke_verdict (*on_half_close)(void *self, spoke_conn *conn, int from_client,
                                   spoke_buf *buf);
} spoke_plugin;

#define SPOKE_PLUGIN_HEADER                                                                \
    .abi_major = SPOKE_ABI_MAJOR, .abi_minor = SPOKE_ABI_MINOR,                            \
    .struct_size = (uint32_t)sizeof(spoke_plugin)

/* ---------------------------------------------------------------------------------------
 * The host table: services a plugin may call. Functions taking spoke_ctx act on behalf of
 * the plugin; those taking spoke_conn act on a connection and may only be called from a
 * hook running for that connection. All are called on the worker's loop thread. A
 * service marked "edge role only" is NULL in the table a control-role host (hubd) passes.
 * ------------------------------------------------------------------------------------- */
struct spoke_host {
    uint16_t abi_major;
    uint16_t abi_minor;
    uint32_t struct_size;

    /* Log a line tagged with the plugin's name, at `level`. Lines below the host's
     * log.level are dropped cheaply. A line is cut at about 4 KiB (ending in "..."). */
    void (*log)(spoke_ctx *ctx, spoke_log_level level, const char *fmt, ...) SPOKE_PRINTF(3, 4);

    /* This plugin's `config:` value for `key` (flattened as in spoke_init_args), or NULL
     * when the key is not set. The string is the host's and lives until fini returns. */
    const char *(*config_get)(spoke_ctx *ctx, const char *key);
    /* The edge's identity (edge.id, edge.namespace); never NULL, may be "". The string
     * is the host's, does not change, and lives until fini returns. */
    const char *(*edge_id)(spoke_ctx *ctx);
    const char *(*edge_namespace)(spoke_ctx *ctx);

    /* Call cb(self, arg) every `ms` milliseconds on the worker's loop, until cancelled or
     * fini. `self` is the plugin's self as it is when the timer fires, so every() may be
     * called from init before *self is set. Returns a timer ID > 0, or a negative
     * spoke_status. */
    int64_t (*every)(spoke_ctx *ctx, uint64_t ms, spoke_timer_cb cb, void *arg);
    /* Cancel a timer from every(). Returns 0, or SPOKE_ERR_INVALID if it is not one. */
    int (*timer_cancel)(spoke_ctx *ctx, int64_t timer_id);

    /* Edge role only. Replace the chunk's bytes with a copy of data[0..len). Any size; 0
     * empties it. `data` may point into the chunk itself (e.g. to drop a prefix). */
    int (*buf_set)(spoke_buf *buf, const void *data, size_t len);
    /* Edge role only. Resize the chunk to `len` bytes, keeping the first min(old, len)
     * bytes, and return a writable pointer to all of them (valid until the hook returns
     * or the next buf_* call), or NULL if memory ran out. buf->data/len reflect the
     * change. */
    uint8_t *(*buf_resize)(spoke_buf *buf, size_t len);

    /* Connection accessors; edge role only. */
    /* The connection's ID, unique within the worker; 0 for a NULL conn. */
    uint64_t (*conn_id)(const spoke_conn *conn);
    /* The client's address: "1.2.3.4:5678", "[::1]:80" or "unix"; "" for a NULL conn.
     * The string is the connection's: it lives until on_close returns (copy it to keep
     * it longer). */
    const char *(*conn_peer)(const spoke_conn *conn);
    /* A per-connection, per-plugin pointer the plugin may use freely; NULL initially.
     * Free what it points to in on_close. Returns NULL only for a NULL conn or ctx. */
    void **(*conn_data)(spoke_conn *conn, spoke_ctx *ctx);
    /* Edge role only. Queue bytes to send back to the peer the current chunk came from
     * (the client in on_open and the client-side hooks, the server in the server-side
     * hooks). The host sends them when the chain run ends, whatever the verdict: return
     * SPOKE_RESPOND to answer instead of forwarding the chunk, SPOKE_CLOSE to answer then
     * close, or SPOKE_CONTINUE to answer and still forward it. Returns 0 or a negative
     * spoke_status. */
    int (*respond)(spoke_conn *conn, const void *data, size_t len);

    /* Emit a signal, as GatewayD's plugins do; the host acts on it:
     *   "log"       fields "level" (debug|info|warn|error) and "message": logged with
     *               the plugin's name and the connection.
     *   "terminate" stop the chain and close the connection once what respond() queued
     *               has been sent; field "reason" is logged.
     * Unknown names are logged at debug and otherwise ignored. That is the built-in
     * behaviour; the operator's policies (the config's `policies:`) may decide otherwise
     * for any signal, name and fields included. Returns 0 or an error. */
    int (*signal)(spoke_ctx *ctx, spoke_conn *conn, const char *name, const spoke_kv *fields,
                  size_t n_fields);

    /* Edge role only. Queue a payload for the control plugin with this plugin's ID. It
     * is committed to the durable queue before the call returns; *pending (if not NULL)
     * receives the number of payloads waiting to be sent. correlation_id may be NULL.
     * Returns 0 or one of the SPOKE_ERR_* payload/queue codes. */
    int (*send_to_control)(spoke_ctx *ctx, const void *payload, size_t len,
                           const char *correlation_id, const spoke_kv *metadata,
                           size_t n_metadata, uint64_t *pending);
    /* Edge role only. As send_to_control, for JSON text: refused with
     * SPOKE_ERR_NOT_JSON unless `json` is one well-formed JSON value; marked with content
     * type "application/json". */
    int (*send_to_control_json)(spoke_ctx *ctx, const char *json, size_t len,
                                const char *correlation_id, const spoke_kv *metadata,
                                size_t n_metadata, uint64_t *pending);

    /* The name of a spoke_status code ("payload too large"); never NULL. The string is
     * static: it lives as long as the host process. */
    const char *(*strerror)(int status);

    /* ---- 1.1 ---- check with SPOKE_HOST_HAS before calling. */

    /* This plugin's `config:` value for `key`, read as a duration exactly as the config
     * file reads one ("500ms", "10s", "2m", "1h", a bare 0; no fractions, no other units)
     * into *out_ms. Returns
     *   0                  the key is set and well-formed: *out_ms holds its value;
     *   0                  the key is not set: *out_ms is left alone, so set it to your
     *                      default before the call (use config_get to tell the cases apart);
     *   SPOKE_ERR_INVALID  the value is malformed, or ctx, key or out_ms is NULL: *out_ms
     *                      is left alone. The host logs nothing: say what is wrong yourself.
     * Ranges are the plugin's to check. */
    int (*config_get_duration)(spoke_ctx *ctx, const char *key, uint64_t *out_ms);
    /* As config_get_duration, for a size ("65536", "64KiB", "1MiB", "1GiB", "1GB") into
     * *out_bytes, with the same return values. */
    int (*config_get_size)(spoke_ctx *ctx, const char *key, uint64_t *out_bytes);

    /* ---- 1.2 ---- check with SPOKE_HOST_HAS before calling.
     *
     * A key-value store, offered in both roles. On the edge (spoked) it is one LMDB store
     * shared by every worker of the spoked (kv.path): state that several workers must see.
     * In the control role (hubd) it is hubd's store, shared by its workers.
     *
     * NAMESPACES. Each plugin has its own keys: its namespace is its configured plugin ID
     * (plugins.list[].id), so two plugins never see each other's keys. Namespace 0 is the
     * host's: a plugin configured without an ID gets SPOKE_ERR_UNSUPPORTED from every KV
     * service. The edge's store and the hub's are different stores: an edge plugin and
     * the control plugin with its ID do not share keys (payloads carry state between
     * them). Keys are byte strings (not NUL-terminated; 0 to SPOKE_KV_MAX_KEY bytes),
     * ordered as memcmp orders them, the shorter first when one is a prefix of the other.
     *
     * VALUE LIFETIME. What kv_get returns is the host's, read-only, and valid until the
     * plugin's next call of any KV service, or the end of the hook or timer callback that
     * made the call, whichever comes first. Copy it to keep it longer. Scan callback
     * arguments are valid only during the callback.
     *
     * TRANSACTIONS. In accept_edge_payload (control role), every KV call reads and writes
     * in the transaction of that delivery: the writes commit together with the batch's
     * duplicate marks, or vanish with them (a hub that dies before its commit), so the KV
     * effects of each payload happen exactly once even when an edge resends it. The
     * plugin sees its own writes within the call; the writes of a call that returns < 0
     * are undone (a payload's KV effects are all or nothing; it is not redelivered). What
     * the plugin keeps in memory or writes elsewhere is at least once: a redelivered
     * payload runs the hook again. Everywhere else (init, on_config_loaded, health, fini,
     * timers, and every hook of the edge role) each call is a transaction of its own,
     * committed before kv_put/kv_del return; there is no multi-key transaction there,
     * and a kv_get then a kv_put is not atomic (another worker may write in between).
     * Durability: hubd flushes every commit to disk; the edge flushes every kv.sync
     * (default 1s). A crash of a spoke process loses nothing committed; on the edge, a
     * power loss may lose the writes of the last kv.sync period.
     *
     * ERRORS, in this order: SPOKE_ERR_INVALID (ctx NULL, a NULL pointer with a non-zero
     * length, a NULL out-pointer or callback); SPOKE_ERR_UNSUPPORTED (no plugin ID, or
     * called from a scan callback); SPOKE_ERR_INVALID for a key, prefix or `after` over
     * SPOKE_KV_MAX_KEY; SPOKE_ERR_PAYLOAD_TOO_LARGE for a value over SPOKE_KV_MAX_VALUE;
     * SPOKE_ERR_KV_UNAVAILABLE (no store is configured, it could not be opened, it is
     * full, or it failed: the host logs why); SPOKE_ERR_NOT_FOUND; SPOKE_ERR_NOMEM.
     * A call that fails changes nothing. */

    /* Look up `key`. On success *val and *vlen describe the value (borrowed as VALUE
     * LIFETIME says; *val is never NULL, even for an empty value). Returns 0,
     * SPOKE_ERR_NOT_FOUND (no such key; *val = NULL, *vlen = 0), or an error above. */
    int (*kv_get)(spoke_ctx *ctx, const void *key, size_t klen, const void **val,
                  size_t *vlen);
    /* Store a copy of val[0..vlen) under `key`, replacing any value. val may be NULL when
     * vlen is 0. Returns 0 or an error above (SPOKE_ERR_KV_UNAVAILABLE when the store is
     * full: delete something, or the operator raises kv.map_size). */
    int (*kv_put)(spoke_ctx *ctx, const void *key, size_t klen, const void *val, size_t vlen);
    /* Delete `key`. Returns 0, SPOKE_ERR_NOT_FOUND (there was no such key), or an error
     * above. */
    int (*kv_del)(spoke_ctx *ctx, const void *key, size_t klen);
    /* Call cb(arg, key, klen, val, vlen) for the keys that begin with prefix[0..plen)
     * (plen 0: every key of the plugin), in key order, strictly after after[0..alen)
     * (after NULL: from the first), for at most `max` keys (0: no limit). To page through
     * many keys, pass the last key a call visited as `after` of the next. The scan sees
     * one consistent snapshot (in accept_edge_payload: the delivery's transaction,
     * including its own writes). Returns 0 (also when cb stopped it with > 0), cb's
     * negative value, or an error above. */
    int (*kv_scan)(spoke_ctx *ctx, const void *prefix, size_t plen, const void *after,
                   size_t alen, size_t max, spoke_kv_scan_cb cb, void *arg);

    /* ---- 1.4 ---- check with SPOKE_HOST_HAS before calling.
     *
     * Metrics, offered in both roles. A plugin registers a metric (usually in init), looks
     * up each series it updates once (metric_series), keeps the pointer, and updates it
     * from any hook or timer: an update is a few nanoseconds, a plain store into memory
     * the host shares with its supervisor, never a system call. The supervisor serves
     * every worker's values, summed, at metrics.listen's /metrics, each series labelled
     * plugin="<the plugin's configured name>". Counters and histograms keep counting
     * across worker restarts (the supervisor keeps what a dead worker had counted);
     * a gauge is the sum of the live workers' values.
     *
     * NAMES follow Prometheus's rules, checked at registration: a metric name matches
     * [a-zA-Z_:][a-zA-Z0-9_:]* (at most 95 bytes) and does not start with "spoke_" (the
     * host's); a counter's name ends in "_total", a gauge's or histogram's does not end
     * in _total, _count, _sum, _bucket or _created. A label name matches
     * [a-zA-Z_][a-zA-Z0-9_]* (at most 31 bytes), does not start with "__", is not
     * "plugin" (the host's) nor, for a histogram, "le". At most 4 label names, label
     * values up to 63 bytes, help text up to 159 bytes, 15 bucket bounds (finite,
     * increasing; +Inf is added). A worker holds 64 metrics and 256 series at most,
     * across its plugins; one name is registered once per worker. */

    /* Register a metric: `type`, `name`, `help` (may be NULL), label_names[0..n_labels)
     * and, for a histogram, the upper bounds buckets[0..n_buckets) (NULL, 0 otherwise).
     * Returns the metric's ID (>= 0) for metric_series, or SPOKE_ERR_INVALID (a rule
     * above is broken, or the name is registered already: the host logs which, naming
     * the metric) or SPOKE_ERR_NOMEM (the worker's table is full). */
    int (*metric_register)(spoke_ctx *ctx, spoke_metric_type type, const char *name,
                           const char *help, const char *const *label_names, size_t n_labels,
                           const double *buckets, size_t n_buckets);
    /* The series of metric `id` with label_values[0..n_values) (one per label name, in
     * their order), created at the first call. Returns it, or NULL (an unknown ID, a
     * wrong number of values, a value too long, the table full: the host logs why).
     * Look it up once and keep it: the lookup compares strings, the updates do not. */
    spoke_metric *(*metric_series)(spoke_ctx *ctx, int id, const char *const *label_values,
                                   size_t n_values);
    /* Add v to a counter (v >= 0; a negative v is ignored) or a gauge. NULL m is
     * ignored, so the result of a failed metric_series may be used as is. */
    void (*metric_add)(spoke_metric *m, double v);
    /* Set a gauge to v (ignored for other kinds and a NULL m). */
    void (*metric_set)(spoke_metric *m, double v);
    /* Count one observation v in a histogram (ignored for other kinds and a NULL m). */
    void (*metric_observe)(spoke_metric *m, double v);
};

/* True when the host table offers `field` (it is inside struct_size and not NULL). */
#define SPOKE_HOST_HAS(host, field)                                                        \
    ((host)->struct_size >= offsetof(spoke_host, field) + sizeof((host)->field) &&         \
     (host)->field != NULL)

/* Define the entry point: SPOKE_PLUGIN_ENTRY(my_table, my_host) exports spoke_plugin_v1,
 * which stores the host table in the plugin's variable `my_host` (a
 * `static const spoke_host *`) and returns &my_table. */
#define SPOKE_PLUGIN_ENTRY(table, host_var)                                                \
    SPOKE_EXPORT const spoke_plugin *spoke_plugin_v1(const spoke_host *spoke_host_in_);    \
    SPOKE_EXPORT const spoke_plugin *spoke_plugin_v1(const spoke_host *spoke_host_in_)     \
    {                                                                                      \
        (host_var) = spoke_host_in_;                                                       \
        return &(table);                                                                   \
    }

#ifdef __cplusplus
}
#endif
#endif /* SPOKE_H */
