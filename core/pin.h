/*
 * pin.h -- a generation's plugin files, read once when the generation starts.
 *
 * Only a reload changes what runs. When a generation starts, the supervisor (which never
 * dlopens) checks every enabled plugin file of its config (plugins.strict_modes,
 * trust.h), scans plugins.dir for plugins.autoload, and copies each file into a sealed
 * memfd (no write, grow, shrink or unseal: not even a worker's plugin can change it).
 * Every worker of the generation, a restarted one included, inherits those descriptors
 * and loads its plugins from them, never from the directory: a file edited in place or
 * added after the generation started runs only after the next reload, and the bytes a
 * worker hashes against `sha256:` are the bytes every worker of the generation runs.
 *
 * Ownership: an spk_pins owns its paths and descriptors (close-on-exec in the
 * supervisor; spk_sup_exec() hands them to workers).
 */
#ifndef SPK_PIN_H
#define SPK_PIN_H

#include <stddef.h>

#include "config.h"
#include "err.h"

typedef struct spk_pin {
    char *path; /* the entry's resolved path (spk_plugin_conf.path) */
    int fd;     /* the sealed copy */
} spk_pin;

typedef struct spk_pins {
    spk_pin *v; /* in config order, autoloaded files last (in name order) */
    size_t n;
} spk_pins;

/* Supervisor: pin every enabled plugin of cfg (autoloaded files are appended to cfg, as
 * the loader does). On failure nothing stays pinned and eb names the file and the reason
 * ("file:line: path: refused: ..."). Errors: SPK_EINVAL (untrusted), SPK_ENOENT, SPK_EIO,
 * SPK_ENOMEM. */
int spk_pins_take(spk_config *cfg, spk_pins *out, spk_errbuf *eb);

/* A copy of src with its own descriptors (a quarantine generation runs its predecessor's
 * files). Returns 0 or SPK_ENOMEM / SPK_EIO. */
int spk_pins_dup(const spk_pins *src, spk_pins *out);

/* Close and free; a zeroed spk_pins is allowed. */
void spk_pins_free(spk_pins *p);

/* Worker: mark the entries of cfg (parsed from the generation's config snapshot) with the
 * inherited descriptors fds[i] of paths[i], appending the autoloaded ones, and set
 * cfg->plugins_pinned: the loader then loads only these. Returns 0 or SPK_ENOMEM. */
int spk_pins_apply(spk_config *cfg, const int *fds, char *const *paths, size_t n,
                   spk_errbuf *eb);

#endif
