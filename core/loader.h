/*
 * loader.h -- finding, checking and loading plugin shared objects.
 *
 * A plugin goes through three steps, each of which may refuse it with a message that
 * names the file and the reason:
 *
 *   open    spk_plugin_open(): SHA-256 of the file (compared with the configured sum,
 *           if any), dlopen(RTLD_NOW | RTLD_LOCAL), dlsym(SPOKE_ENTRY_SYMBOL), call the
 *           entry, check abi_major / abi_minor / struct_size, copy the table (at most
 *           struct_size bytes, into a zeroed spoke_plugin), check name and version.
 *   check   spk_plugin_set_load(): every enabled plugin of the config (plus unlisted files
 *           of plugins.dir under plugins.autoload) is opened; duplicate names and IDs are
 *           refused; `dependencies` are checked under plugins.compatibility.
 *   init    spk_plugin_set_init(): each plugin's init, in config order, then
 *           on_config_loaded of each.
 *
 * A refused plugin is not loaded and the whole set fails: spoke never serves with a
 * partial chain the operator did not ask for. The caller decides what that means (at
 * start: exit with the message; at reload: keep the old generation).
 *
 * Ownership: an spk_plugin_set owns its plugins. The loader only opens and closes files
 * and runs init; unloading an initialised set (fini in reverse order, the plugins' timers,
 * dlclose) is the host's: spk_host_unload() in host.h, the one unload sequence. The loader
 * does not depend on the host module.
 */
#ifndef SPK_LOADER_H
#define SPK_LOADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "err.h"
#include "slot.h"
#include "spoke.h"

typedef struct spk_host_env spk_host_env; /* host.h */
typedef struct spk_timer spk_timer;       /* host.c */

/* The host's side of spoke_ctx: one per loaded plugin. */
struct spoke_ctx {
    struct spk_plugin *plugin;
};

typedef struct spk_plugin {
    spoke_plugin table;      /* the plugin's table, zero-extended to the host's size */
    uint32_t plugin_struct_size; /* struct_size the plugin declared */
    void *dl;                /* dlopen handle */
    int mfd;                 /* the private in-memory copy dlopen mapped; 0: none */
    char *path;              /* file it was loaded from (owned) */
    char *name;              /* unique instance name: config name, else table.name (owned) */
    uint32_t id;             /* configured plugin ID (0: none) */
    unsigned index;          /* position in the chain (config order) */
    uint8_t sha256[32];      /* of the file, computed before dlopen */
    const spk_plugin_conf *conf; /* borrowed from the config; NULL when opened bare */
    spoke_ctx ctx;           /* the handle the plugin sees */
    void *self;              /* what init stored */
    bool initialised;        /* init returned 0; fini is due */
    spk_host_env *env;       /* the worker's host environment (borrowed) */
    spk_slot *slot;          /* the watchdog slot its hooks are stamped in: the worker's
                                (borrowed), else own_slot; never NULL */
    spk_slot own_slot;       /* for a plugin loaded bare (a tool, a test) */
    spk_timer *timers;       /* timers from host->every(), freed at unload */
    char log_prefix[96];     /* "plugin NAME: " */
} spk_plugin;

typedef struct spk_plugin_set {
    spk_plugin **v;
    size_t n;
} spk_plugin_set;

/* Hex string of a 32-byte digest into out[65]. */
void spk_sha256_hex(const uint8_t sum[32], char out[65]);
/* SHA-256 of a file. Returns 0, SPK_ENOENT or SPK_EIO (message in eb). */
int spk_sha256_file(const char *path, uint8_t sum[32], spk_errbuf *eb);

/* Open one plugin file and check its table (the "open" step above). `expect_sha256` may
 * be NULL. `host` is the table passed to the entry point. On success *out is a plugin
 * the caller releases with spk_plugin_close(). Errors: SPK_ENOENT, SPK_EIO,
 * SPK_ECHECKSUM (both sums in the message), SPK_EDLOPEN, SPK_EABI, SPK_ENOMEM. */
int spk_plugin_open(const char *path, const uint8_t *expect_sha256, const spoke_host *host,
                    spk_plugin **out, spk_errbuf *eb);

/* dlclose and free a plugin that is not initialised (never was, or spk_host_unload() ran
 * its fini): fini and the timers are the host's. NULL is allowed. */
void spk_plugin_close(spk_plugin *p);

/* Parse and check one requirement string against a set ("cache>=1.2"). Returns 0 when
 * met, SPK_EREQUIRES with the reason in eb, or SPK_EINVAL for a malformed string. */
int spk_requirement_check(const char *req, spk_plugin *const *plugins, size_t n,
                          spk_errbuf *eb);

/* Compare two "MAJOR.MINOR.PATCH" versions (missing parts are 0, a suffix after '-' is
 * ignored): <0, 0, >0. */
int spk_version_cmp(const char *a, const char *b);

/* The quarantine key of a config entry: "NAME@PATH" with NAME the configured name ("" when
 * none). It identifies an entry before its file is opened, so a plugin that crashes while
 * loading can be left out too. */
void spk_plugin_key(const spk_plugin_conf *pc, char *out, size_t cap);

/* plugins.autoload: append an entry for every *.so of plugins.dir that the list does not
 * name, in name order (so the chain order is reproducible). Reads the directory only (no
 * dlopen): the supervisor's pins (pin.h) use it. Returns 0, SPK_ENOENT, SPK_EIO or
 * SPK_ENOMEM. */
int spk_plugin_autoload(spk_config *cfg, spk_errbuf *eb);

/* Load every enabled plugin of `cfg` (the "open" and "check" steps), except the entries
 * whose key (spk_plugin_key) is in skip[0..n_skip) (quarantined). Each plugin gets `env`
 * and `slot` (both borrowed, may be NULL: no environment; its own slot). Autoloaded files
 * are appended to cfg->plugins (hence non-const). Files are read from the supervisor's
 * pins when cfg->plugins_pinned (a supervised worker; pin.h), else from their paths under
 * plugins.strict_modes (trust.h); the pins are closed once read (pin_fd = -1). On failure
 * nothing stays loaded. */
int spk_plugin_set_load(spk_config *cfg, const spoke_host *host, spk_host_env *env,
                        spk_slot *slot, const char *const *skip, size_t n_skip,
                        spk_plugin_set *out, spk_errbuf *eb);

/* Call init of every plugin in order, then on_config_loaded of each. Each call is stamped
 * in the plugin's slot (spk_slot_enter/leave), so a crash or hang in init
 * or on_config_loaded is attributed to its plugin. On an init error SPK_EPLUGIN_INIT is
 * returned: the plugins before the failed one stay initialised, the failed one is not
 * (its fini never runs), and spk_host_unload() finalises the set as after a success. */
int spk_plugin_set_init(spk_plugin_set *set, spoke_role role, spk_errbuf *eb);

/* Tell the supervisor which plugins run (name, version, quarantine key, ID) in status
 * slot `sl`, before any of their code does, so a crash in init is attributed. */
struct spk_wslot; /* status.h */
void spk_plugin_set_publish(const spk_plugin_set *set, struct spk_wslot *sl);

#endif
