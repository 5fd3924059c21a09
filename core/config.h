/*
 * config.h -- spoke's configuration: one YAML file, parsed with libyaml into spk_config.
 *
 * spk_config_load() reads the file, applies defaults, and validates every key: an unknown
 * key, a wrong type or an out-of-range value fails the load with a message naming the
 * file, the line and the dotted key ("spoke.yaml:14: plugins.hook_timeout: expected a
 * duration such as 50ms or 2s, got 'fast'"). Durations and sizes are read by
 * core/base/units.h ("30s", "100ms", "1h"; "64KiB", "1GiB").
 * The sketch of keys lives in docs/config.md; every key below is documented there with
 * its default and range, which are written once in code: the key's row in config.c.
 *
 * Ownership: spk_config_load() returns a config the caller frees with spk_config_free();
 * every string inside is owned by it.
 */
#ifndef SPK_CONFIG_H
#define SPK_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "spoke.h"
#include "units.h"

/* Caps of configured counts, each the size of what holds them at run time; a config over
 * one is refused at load with a message naming the key and the cap. */
#define SPK_WORKERS_MAX 256     /* listen.workers, hub.workers (and `auto`): status slots */
#define SPK_LISTEN_MAX 64       /* listen.address, hub.listen entries: a worker's sockets */
#define SPK_PLUGINS_MAX 64      /* plugins enabled in a generation (list + autoload): the
                                   plugin table of a status slot */
#define SPK_CRASH_LIMIT_MAX 100 /* plugins.crash_limit: the supervisor's crash-time ring */

enum spk_compat { SPK_COMPAT_STRICT = 0, SPK_COMPAT_LOOSE = 1 };
enum spk_connect_mode { SPK_CONNECT_EAGER = 0, SPK_CONNECT_LAZY = 1 };

typedef struct spk_plugin_conf {
    char *name;          /* `name:`; NULL means "the name in the plugin's table" */
    uint32_t id;         /* `id:`; 0 when not given */
    char *file;          /* `file:` as written */
    char *path;          /* file resolved against plugins.dir (absolute files kept) */
    bool has_sha256;     /* `sha256:` given */
    uint8_t sha256[32];  /* its value, decoded from 64 hex digits */
    bool enabled;        /* `enabled:`; a disabled plugin is not loaded */
    bool autoloaded;     /* found in plugins.dir, not listed (plugins.autoload) */
    char **args;         /* `args:` list of strings, as given */
    size_t n_args;
    char **env;          /* `env:` list of "KEY=value" strings, as given */
    size_t n_env;
    spoke_kv *config;    /* `config:` map flattened ("a.b", "list.0"); values as text */
    size_t n_config;
    size_t *config_sorted; /* indexes into config in strcmp order of the keys, for
                              spk_plugin_conf_get; the parser sets it (NULL when n_config
                              is 0, or in a conf built by hand: then config is scanned) */
    int line;            /* line of this entry in the config file, for messages */
    int pin_fd;          /* > 0: the supervisor's sealed copy of the file, which a supervised
                            worker loads instead of `path` (core/pin.h); 0: none */
    char *metrics_socket; /* `metrics_socket:` a Unix socket where the plugin serves its
                             own Prometheus text (the merger scrapes it); NULL: none */
} spk_plugin_conf;

/* A piece of Lua from the config (policies), with the line of the file its first line of
 * code is on, so that Lua's messages can name the file's line. */
typedef struct spk_lua_text {
    char *code; /* NULL: not given */
    int line;
    bool lines; /* a literal block (|): line + N - 1 is the file's line of the code's line N;
                   else every line of the code is reported as `line` */
} spk_lua_text;

/* policies.list[].action (core/policy.h says what each does). SPK_PA_LUA: `run:` given. */
enum spk_policy_action {
    SPK_PA_LOG = 0,
    SPK_PA_TERMINATE = 1,
    SPK_PA_PASSTHROUGH = 2,
    SPK_PA_CLOSE = 3,
    SPK_PA_SEND_TO_CONTROL = 4,
    SPK_PA_LUA = 5,
};
/* policies.list[].then: what follows log and send_to_control. */
enum spk_policy_then {
    SPK_PT_DEFAULT = 0, /* the action's own: log -> passthrough, send_to_control -> builtin */
    SPK_PT_BUILTIN = 1,
    SPK_PT_PASSTHROUGH = 2,
    SPK_PT_TERMINATE = 3,
    SPK_PT_CLOSE = 4,
};

/* One entry of policies.list (docs/policies.md). */
typedef struct spk_policy_conf {
    char *name;          /* `name:`; NULL: none (messages say policies.list[i]) */
    char *signal;        /* `signal:`: the signal's name, or "*" for every plugin signal */
    spk_lua_text when;   /* `when:`: a Lua condition; no code: always */
    int action;          /* enum spk_policy_action (`action:`, or SPK_PA_LUA for `run:`) */
    bool has_action;     /* `action:` given */
    spk_lua_text run;    /* `run:`: an action written in Lua */
    int level;           /* `level:` for log: 0 = the signal's own, else spoke_log_level + 1 */
    char *message;       /* `message:` template for log; NULL: the built-in one */
    char *answer;        /* `answer:` for terminate: sent to the peer first; NULL: none */
    uint32_t to;         /* `to:` for send_to_control: the receiving plugin ID; 0: the
                            signalling plugin's */
    int then;            /* enum spk_policy_then */
    int line;            /* line of the entry in the config file */
} spk_policy_conf;

typedef struct spk_config {
    char *file;                /* the path the config was loaded from */
    spoke_role role;           /* edge (spoked) or control (hubd): which sections it has */

    /* Each key's default and range are written once, in its row of config.c's tables
     * (docs/config.md lists them, and a test holds it to them): the comments below say
     * what a value means, not what it defaults to. */

    /* edge: */
    char *edge_id;             /* edge.id (default computed: the host name) */
    char *edge_namespace;      /* edge.namespace */

    /* listen: */
    char **listen;             /* listen.address: one string or a list; "host:port",
                                  "[v6]:port" or "unix:/path" */
    size_t n_listen;
    char *upstream;            /* listen.upstream: "host:port", "[v6]:port" or "unix:/path";
                                  required */
    int workers;               /* listen.workers: number, or "auto" (0) = number of cores */
    enum spk_connect_mode upstream_connect; /* listen.upstream_connect: eager|lazy */
    uint64_t connect_timeout_ms;  /* listen.connect_timeout */
    size_t read_chunk;         /* listen.read_chunk: bytes per read */
    size_t high_watermark;     /* listen.high_watermark: per-direction pending bytes at which
                                  reading from the source stops */
    int backlog;               /* listen.backlog */
    size_t max_connections;    /* listen.max_connections: per worker */
    size_t max_open_files;     /* listen.max_open_files: each worker's RLIMIT_NOFILE (soft
                                  limit); 0: as the supervisor has it */

    /* plugins: */
    char *plugins_dir;         /* plugins.dir */
    bool autoload;             /* plugins.autoload: load unlisted .so in dir */
    enum spk_compat compatibility; /* plugins.compatibility: strict|loose */
    uint64_t health_check_period_ms; /* plugins.health_check_period */
    uint64_t hook_timeout_ms;  /* plugins.hook_timeout; hard kill at 10x */
    uint64_t start_timeout_ms; /* plugins.start_timeout */
    bool reload_on_crash;      /* plugins.reload_on_crash */
    unsigned health_fail_limit;/* plugins.health_fail_limit */
    unsigned crash_limit;      /* plugins.crash_limit */
    uint64_t crash_window_ms;  /* plugins.crash_window */
    uint64_t drain_timeout_ms; /* plugins.drain_timeout */
    uint64_t tick_ms;          /* plugins.tick: on_tick period */
    spk_plugin_conf *plugins;  /* plugins.list, in config order; autoloaded ones appended
                                  by the loader, not by the parser */
    size_t n_plugins;

    /* queue: (its defaults are the queue's: config.c names them in one block) */
    char *queue_path;          /* queue.path */
    uint64_t queue_max_pending;/* queue.max_pending */
    uint64_t queue_max_bytes;  /* queue.max_bytes */
    uint64_t queue_retention_ms; /* queue.retention */
    bool queue_sync_always;    /* queue.sync: "always" */
    uint64_t queue_sync_interval_ms; /* queue.sync: a duration */
    uint64_t queue_map_size;   /* queue.map_size: LMDB map size */
    uint64_t queue_journal_size; /* queue.journal_size: the append ring */

    /* uplink: */
    char *uplink_url;          /* NULL: no uplink */
    uint64_t uplink_heartbeat_ms; /* uplink.heartbeat */
    unsigned uplink_batch_size;   /* uplink.batch_size */
    char *uplink_token_file;   /* uplink.token_file: the bearer token, first line */
    char *uplink_ca;           /* uplink.ca: CAs (PEM) to verify the hub; NULL: the system's */
    char *uplink_cert;         /* uplink.cert, uplink.key: client certificate and key (PEM) */
    char *uplink_key;          /*   for mutual TLS; both or neither */
    uint64_t uplink_max_batch_bytes; /* uplink.max_batch_bytes: wire bytes per batch */
    uint64_t uplink_timeout_ms;      /* uplink.timeout: one call's deadline */

    /* hub: (control role; the listener, workers and backlog are the listen fields above) */
    char *hub_store;           /* hub.store: the LMDB directory of dedupe marks, edges, KV */
    uint64_t hub_map_size;     /* hub.map_size */
    uint64_t hub_dedupe_retention_ms; /* hub.dedupe_retention: marks are kept this long */
    uint64_t hub_heartbeat_ms; /* hub.heartbeat: what edges are asked to use; 0 = theirs */
    unsigned hub_batch_size;   /* hub.batch_size: likewise; 0 = theirs */
    /* tls: (control role) */
    char *tls_cert, *tls_key;  /* tls.cert, tls.key: the server's chain and key (PEM) */
    char *tls_client_ca;       /* tls.client_ca: client certificates required, verified */
    /* auth: (control role) */
    char *auth_token_file;     /* auth.token_file: "EDGE_ID SHA256" lines (hub_auth.h) */
    /* limits: (control role; limits.max_connections is the max_connections field) */
    uint64_t limit_max_message;     /* limits.max_message: bytes of one request */
    unsigned limit_max_streams;     /* limits.max_streams: per connection */
    uint64_t limit_max_header_list; /* limits.max_header_list: bytes */
    uint64_t limit_request_timeout_ms; /* limits.request_timeout */
    uint64_t limit_idle_timeout_ms;    /* limits.idle_timeout */

    /* metrics: */
    char *metrics_listen;      /* NULL: no metrics endpoint */

    /* log: */
    spoke_log_level log_level; /* log.level: debug|info|warn|error */
    int log_format;            /* log.format: text|json (spk_log_format, core/log.h) */

    /* Added after 0.1 (fields only ever appended): */
    char *run_dir;             /* top-level `run_dir:` (a key, not a section): where the
                                  supervisor keeps spoked.pid and spoked.sock; at most 90
                                  bytes. Default computed: "/run/spoke" when running as
                                  root, else the directory of the config file (so
                                  unprivileged and test instances with different configs
                                  never collide). */

    /* kv: the edge's KV store (the KV host services; core/kv_conf.h) */
    char *kv_path;             /* kv.path: the store's directory */
    uint64_t kv_map_size;      /* kv.map_size: LMDB map size, the most it can hold */
    uint64_t kv_sync_ms;       /* kv.sync: the edge's period between flushes to disk */

    bool strict_modes;         /* plugins.strict_modes: owner and mode checks (core/trust.h) */
    char *user;                /* top-level `user:`: the account workers run as (core/privs.h);
                                  NULL: not set */
    char *group;               /* top-level `group:`; NULL: the user's primary group */
    bool plugins_pinned;       /* not a key: the plugin set is the supervisor's pins (every
                                  enabled entry has pin_fd; no plugins.dir scan), core/pin.h */
    /* metrics: (more) */
    bool metrics_merger;       /* metrics.merger: scrape the plugins' metrics_socket */
    uint64_t metrics_merge_period_ms; /* metrics.merge_period */
    unsigned metrics_hook_sample; /* metrics.hook_sample: time 1 in N hook calls; 0 = none */

    /* policies: what the host does with plugins' signals (core/policy.h) */
    uint64_t policy_timeout;   /* policies.timeout: Lua instructions per evaluation */
    uint64_t policy_memory;    /* policies.memory: bytes one worker's Lua state may hold */
    spk_lua_text policy_setup; /* policies.setup: Lua run once when the state is created */
    spk_policy_conf *policies; /* policies.list, in config order (first match wins) */
    size_t n_policies;
} spk_config;

/* Load and validate `path` as spoked's config (the edge role). On success *out is a config
 * the caller frees with spk_config_free(). On failure returns SPK_ECONFIG (or
 * SPK_ENOENT/SPK_EIO/SPK_ENOMEM) and fills eb with "file:line: key: what is wrong". */
int spk_config_load(const char *path, spk_config **out, spk_errbuf *eb);

/* The same for a role: SPOKE_ROLE_EDGE (spoked: edge, listen, plugins, queue, uplink, ...)
 * or SPOKE_ROLE_CONTROL (hubd: hub, tls, auth, limits, plugins, ...). A section of the
 * other role is refused as unknown, naming the role's sections. */
int spk_config_load_role(const char *path, spoke_role role, spk_config **out, spk_errbuf *eb);

/* Free a config from spk_config_load(); NULL is allowed. */
void spk_config_free(spk_config *cfg);

/* Append a plugin entry for an autoloaded file (plugins.autoload). Returns 0 or
 * SPK_ENOMEM; the new entry has the entry rows' defaults and autoloaded = true. */
int spk_config_add_autoload(spk_config *cfg, const char *file, const char *path);

/* Print the effective configuration to f: every key of every section with its value,
 * defaults included, as YAML that spk_config_load() reads back to the same values.
 * Durations and sizes print in the largest unit that divides them exactly ("1m", "64KiB");
 * `~` stands for "not set". Per plugin entry, comments give its line, its resolved
 * `path`, and mark entries appended by the loader as autoloaded; `config:` prints in its
 * flattened form ("a.b": value), which loads back to the same entries. Used by
 * `spoked --check-config`. */
void spk_config_dump(const spk_config *cfg, FILE *f);

/* The value of flattened key `key` in pc's `config:` (config_get), or NULL when it is not
 * set: a binary search, so a plugin reading each of many keys costs n log n, not n^2. The
 * string is pc's. */
const char *spk_plugin_conf_get(const spk_plugin_conf *pc, const char *key);

#endif
