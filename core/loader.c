/*
 * loader.c -- open, check, and initialise plugins (see loader.h for the three steps).
 *
 * Order of checks in spk_plugin_open(), cheapest and safest first: the file is copied into
 * a private in-memory file (memfd) and hashed on the way, before dlopen, so a file with the
 * wrong sum never runs a constructor in our process, the bytes checked are the bytes
 * loaded, and replacing the file on disk later cannot touch a running worker. Each open
 * is a separate copy, so one .so configured twice gets two independent sets of statics. Then dlopen with RTLD_NOW (an unresolved symbol fails here, not in the middle
 * of traffic) and RTLD_LOCAL (plugins cannot see each other's symbols). The entry's table
 * is read in two steps: the three version fields first, then at most struct_size bytes.
 */
#include "loader.h"
#include "status.h"

#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "log.h"
#include "trust.h"

/* The smallest table a 1.0 plugin may declare: everything up to and including the
 * dependencies field (name and version are mandatory; hooks may be cut off). */
#define SPK_PLUGIN_MIN_SIZE (offsetof(spoke_plugin, dependencies) + sizeof(const char *const *))

void spk_sha256_hex(const uint8_t sum[32], char out[65])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[sum[i] >> 4];
        out[2 * i + 1] = hex[sum[i] & 15];
    }
    out[64] = '\0';
}

/* Hash `fd` from its current offset to EOF; if `copy_fd` >= 0, write the bytes there too. */
static int hash_fd(int fd, int copy_fd, const char *path, uint8_t sum[32], spk_errbuf *eb)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(md);
        return spk_errf(eb, SPK_ENOMEM, "%s: cannot start SHA-256", path);
    }
    int rc = 0;
    uint8_t chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof(chunk));
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = spk_errf(eb, SPK_EIO, "cannot read %s: %s", path, strerror(errno));
            break;
        }
        EVP_DigestUpdate(md, chunk, (size_t)n);
        for (ssize_t off = 0; copy_fd >= 0 && off < n;) {
            ssize_t w = write(copy_fd, chunk + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                rc = spk_errf(eb, SPK_EIO, "cannot copy %s: %s", path, strerror(errno));
                goto out;
            }
            off += w;
        }
    }
out:;
    unsigned len = 32;
    if (rc == 0)
        EVP_DigestFinal_ex(md, sum, &len);
    EVP_MD_CTX_free(md);
    return rc;
}

int spk_sha256_file(const char *path, uint8_t sum[32], spk_errbuf *eb)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s", path,
                        strerror(errno));
    int rc = hash_fd(fd, -1, path, sum, eb);
    close(fd);
    return rc;
}

/* Copy the plugin into an anonymous in-memory file while hashing it. The host then
 * dlopens the copy, so (1) the bytes whose sum was checked are exactly the bytes that run,
 * and (2) a file overwritten in place on disk later (cp over it, a half-written download)
 * cannot change the code under a running worker: its mapping is of the private copy.
 * The source is the supervisor's sealed copy when the plugin is pinned (`pin_fd` > 0,
 * pin.h: opened anew through /proc, so workers never share a file offset), else the file
 * at `path`, under plugins.strict_modes when `strict` (trust.h).
 * Returns the memfd, or a negative spk_err. */
static int private_copy(const char *path, int pin_fd, bool strict, uint8_t sum[32],
                        spk_errbuf *eb)
{
    int fd = -1, rc;
    if (pin_fd > 0) {
        char fdpath[64];
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", pin_fd);
        fd = open(fdpath, O_RDONLY | O_CLOEXEC);
        rc = fd >= 0 ? 0
                     : spk_errf(eb, SPK_EIO, "%s: cannot open the supervisor's copy: %s", path,
                                strerror(errno));
    } else {
        rc = spk_trust_open(path, strict, &fd, eb);
    }
    if (rc != 0)
        return rc;
    const char *base = strrchr(path, '/');
    int mfd = memfd_create(base ? base + 1 : path, MFD_CLOEXEC);
    if (mfd < 0) {
        int e = errno;
        close(fd);
        return spk_errf(eb, SPK_EIO, "%s: memfd_create: %s", path, strerror(e));
    }
    rc = hash_fd(fd, mfd, path, sum, eb);
    close(fd);
    if (rc != 0) {
        close(mfd);
        return rc;
    }
    return mfd;
}

static bool valid_version(const char *v)
{
    /* MAJOR[.MINOR[.PATCH]][-suffix], digits only in the numeric parts. */
    if (v == NULL || !isdigit((unsigned char)*v))
        return false;
    for (; *v && *v != '-' && *v != '+'; v++)
        if (!isdigit((unsigned char)*v) && *v != '.')
            return false;
    return true;
}

static bool valid_name(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!isalnum(c) && c != '-' && c != '_' && c != '.')
            return false;
    }
    return true;
}

/* Read the plugin's table through its entry point and copy it by struct_size. */
static int check_table(spk_plugin *p, const spoke_plugin *t, spk_errbuf *eb)
{
    if (t == NULL)
        return spk_errf(eb, SPK_EABI, "%s: refused: %s() returned NULL", p->path,
                        SPOKE_ENTRY_SYMBOL);
    if (t->abi_major != SPOKE_ABI_MAJOR)
        return spk_errf(eb, SPK_EABI,
                        "%s: refused: plugin ABI %u.%u, host ABI %u.%u (major versions "
                        "differ; rebuild the plugin against this host's spoke.h)",
                        p->path, t->abi_major, t->abi_minor, SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR);
    if (t->abi_minor > SPOKE_ABI_MINOR)
        return spk_errf(eb, SPK_EABI,
                        "%s: refused: plugin needs ABI %u.%u, host provides %u.%u (upgrade "
                        "spoke or build the plugin against the %u.%u header)",
                        p->path, t->abi_major, t->abi_minor, SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR,
                        SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR);
    if (t->struct_size < SPK_PLUGIN_MIN_SIZE)
        return spk_errf(eb, SPK_EABI,
                        "%s: refused: plugin table struct_size %u is smaller than the "
                        "1.0 minimum %zu",
                        p->path, t->struct_size, SPK_PLUGIN_MIN_SIZE);
    size_t n = t->struct_size < sizeof(spoke_plugin) ? t->struct_size : sizeof(spoke_plugin);
    memset(&p->table, 0, sizeof(p->table));
    memcpy(&p->table, t, n);
    p->plugin_struct_size = t->struct_size;
    if (!valid_name(p->table.name))
        return spk_errf(eb, SPK_EABI,
                        "%s: refused: plugin name is missing or invalid (1-64 characters of "
                        "[A-Za-z0-9._-])",
                        p->path);
    if (!valid_version(p->table.version))
        return spk_errf(eb, SPK_EABI,
                        "%s: refused: plugin '%s' has a missing or invalid version (want "
                        "MAJOR.MINOR.PATCH)",
                        p->path, p->table.name);
    return 0;
}

static int plugin_open(const char *path, int pin_fd, bool strict, const uint8_t *expect_sha256,
                       const spoke_host *host, spk_plugin **out, spk_errbuf *eb)
{
    *out = NULL;
    spk_plugin *p = calloc(1, sizeof(*p));
    if (p == NULL || (p->path = strdup(path)) == NULL) {
        free(p);
        return spk_errf(eb, SPK_ENOMEM, "%s: out of memory", path);
    }
    p->ctx.plugin = p;
    p->slot = &p->own_slot;

    int mfd = private_copy(path, pin_fd, strict, p->sha256, eb);
    int rc = mfd < 0 ? mfd : 0;
    if (rc != 0)
        goto fail;
    if (expect_sha256 != NULL && memcmp(expect_sha256, p->sha256, 32) != 0) {
        char want[65], got[65];
        spk_sha256_hex(expect_sha256, want);
        spk_sha256_hex(p->sha256, got);
        close(mfd);
        rc = spk_errf(eb, SPK_ECHECKSUM,
                      "%s: refused: SHA-256 mismatch: config says %s, file is %s", path, want,
                      got);
        goto fail;
    }

    char fdpath[64];
    snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", mfd);
    p->dl = dlopen(fdpath, RTLD_NOW | RTLD_LOCAL);
    /* Keep the memfd open while the object is loaded: glibc recognises loaded objects by
     * path, and a reused fd number would make a later dlopen return this object. */
    p->mfd = mfd;
    if (p->dl == NULL) {
        const char *why = dlerror();
        /* dlerror names the /proc path; name the operator's file instead. */
        const char *colon = why ? strstr(why, ": ") : NULL;
        rc = spk_errf(eb, SPK_EDLOPEN, "%s: refused: dlopen failed: %s", path,
                      colon ? colon + 2 : (why ? why : "unknown error"));
        goto fail;
    }
    typedef const spoke_plugin *(*entry_fn)(const spoke_host *);
    void *sym = dlsym(p->dl, SPOKE_ENTRY_SYMBOL);
    if (sym == NULL) {
        rc = spk_errf(eb, SPK_EDLOPEN,
                      "%s: refused: no %s symbol (is it a spoke plugin? build it with "
                      "SPOKE_PLUGIN_ENTRY)",
                      path, SPOKE_ENTRY_SYMBOL);
        goto fail;
    }
    entry_fn entry;
    memcpy(&entry, &sym, sizeof(entry));
    rc = check_table(p, entry(host), eb);
    if (rc != 0)
        goto fail;
    p->name = strdup(p->table.name);
    if (p->name == NULL) {
        rc = spk_errf(eb, SPK_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    snprintf(p->log_prefix, sizeof(p->log_prefix), "plugin %s: ", p->name);
    *out = p;
    return 0;
fail:
    spk_plugin_close(p);
    return rc;
}

int spk_plugin_open(const char *path, const uint8_t *expect_sha256, const spoke_host *host,
                    spk_plugin **out, spk_errbuf *eb)
{
    return plugin_open(path, 0, false, expect_sha256, host, out, eb);
}

void spk_plugin_close(spk_plugin *p)
{
    if (p == NULL)
        return;
    if (p->dl != NULL)
        dlclose(p->dl);
    if (p->mfd > 0)
        close(p->mfd);
    free(p->path);
    free(p->name);
    free(p);
}

/* ---- versions and requirements ---------------------------------------------------- */

int spk_version_cmp(const char *a, const char *b)
{
    for (int part = 0; part < 3; part++) {
        unsigned long x = 0, y = 0;
        if (*a && *a != '-' && *a != '+')
            x = strtoul(a, (char **)&a, 10);
        if (*b && *b != '-' && *b != '+')
            y = strtoul(b, (char **)&b, 10);
        if (x != y)
            return x < y ? -1 : 1;
        if (*a == '.')
            a++;
        if (*b == '.')
            b++;
    }
    return 0;
}

enum req_op { OP_ANY, OP_EQ, OP_NE, OP_GT, OP_GE, OP_LT, OP_LE };

static const char *const op_names[] = {"", "=", "!=", ">", ">=", "<", "<="};

/* Split "name>=1.2" into name, op and version. */
static int parse_requirement(const char *req, char *name, size_t name_cap, enum req_op *op,
                             const char **version)
{
    size_t n = strcspn(req, "=!<> ");
    if (n == 0 || n >= name_cap)
        return SPK_EINVAL;
    memcpy(name, req, n);
    name[n] = '\0';
    if (!valid_name(name))
        return SPK_EINVAL;
    const char *s = req + n;
    while (*s == ' ')
        s++;
    if (*s == '\0') {
        *op = OP_ANY;
        *version = NULL;
        return 0;
    }
    if (strncmp(s, ">=", 2) == 0)
        *op = OP_GE, s += 2;
    else if (strncmp(s, "<=", 2) == 0)
        *op = OP_LE, s += 2;
    else if (strncmp(s, "==", 2) == 0)
        *op = OP_EQ, s += 2;
    else if (strncmp(s, "!=", 2) == 0)
        *op = OP_NE, s += 2;
    else if (*s == '>')
        *op = OP_GT, s++;
    else if (*s == '<')
        *op = OP_LT, s++;
    else if (*s == '=')
        *op = OP_EQ, s++;
    else
        return SPK_EINVAL;
    while (*s == ' ')
        s++;
    if (!valid_version(s))
        return SPK_EINVAL;
    *version = s;
    return 0;
}

static bool op_holds(enum req_op op, int cmp)
{
    switch (op) {
    case OP_ANY: return true;
    case OP_EQ: return cmp == 0;
    case OP_NE: return cmp != 0;
    case OP_GT: return cmp > 0;
    case OP_GE: return cmp >= 0;
    case OP_LT: return cmp < 0;
    case OP_LE: return cmp <= 0;
    }
    return false;
}

int spk_requirement_check(const char *req, spk_plugin *const *plugins, size_t n, spk_errbuf *eb)
{
    char name[80];
    enum req_op op;
    const char *version;
    if (parse_requirement(req, name, sizeof(name), &op, &version) != 0)
        return spk_errf(eb, SPK_EINVAL,
                        "malformed requirement '%s' (want name, or name followed by one of "
                        "= == != > >= < <= and a version)",
                        req);
    for (size_t i = 0; i < n; i++) {
        /* A requirement names a plugin by its table name (what its author called it). */
        if (strcmp(plugins[i]->table.name, name) != 0)
            continue;
        if (op_holds(op, version ? spk_version_cmp(plugins[i]->table.version, version) : 0))
            return 0;
        return spk_errf(eb, SPK_EREQUIRES, "requires %s%s%s but %s %s is loaded", name,
                        op_names[op], version, name, plugins[i]->table.version);
    }
    return spk_errf(eb, SPK_EREQUIRES, "requires %s%s%s, which is not loaded", name,
                    op_names[op], version ? version : "");
}

/* ---- the set ----------------------------------------------------------------------- */

static bool listed(const spk_config *cfg, const char *path)
{
    for (size_t i = 0; i < cfg->n_plugins; i++)
        if (strcmp(cfg->plugins[i].path, path) == 0)
            return true;
    return false;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* plugins.autoload: append every *.so of plugins.dir that the list does not name, in
 * name order so that the chain order is reproducible. */
int spk_plugin_autoload(spk_config *cfg, spk_errbuf *eb)
{
    DIR *d = opendir(cfg->plugins_dir);
    if (d == NULL)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO,
                        "plugins.autoload: cannot open plugins.dir %s: %s", cfg->plugins_dir,
                        strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len < 4 || strcmp(de->d_name + len - 3, ".so") != 0 || de->d_name[0] == '.')
            continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            char **nv = realloc(names, ncap * sizeof(*nv));
            if (nv == NULL) {
                rc = SPK_ENOMEM;
                goto done;
            }
            names = nv;
            cap = ncap;
        }
        if ((names[n] = strdup(de->d_name)) == NULL) {
            rc = SPK_ENOMEM;
            goto done;
        }
        n++;
    }
    if (n > 1)
        qsort(names, n, sizeof(*names), name_cmp);
    for (size_t i = 0; i < n && rc == 0; i++) {
        char path[4096];
        if ((size_t)snprintf(path, sizeof(path), "%s/%s", cfg->plugins_dir, names[i]) >=
            sizeof(path))
            continue;
        if (!listed(cfg, path))
            rc = spk_config_add_autoload(cfg, names[i], path);
    }
done:
    if (rc == SPK_ENOMEM)
        spk_errf(eb, rc, "plugins.autoload: out of memory");
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return rc;
}

static int set_push(spk_plugin_set *set, spk_plugin *p)
{
    spk_plugin **nv = realloc(set->v, (set->n + 1) * sizeof(*nv));
    if (nv == NULL)
        return SPK_ENOMEM;
    set->v = nv;
    set->v[set->n++] = p;
    return 0;
}

static int check_duplicates(const spk_plugin_set *set, spk_errbuf *eb)
{
    for (size_t i = 0; i < set->n; i++) {
        for (size_t j = 0; j < i; j++) {
            const spk_plugin *a = set->v[j], *b = set->v[i];
            if (strcmp(a->name, b->name) == 0)
                return spk_errf(eb, SPK_EDUPLICATE,
                                "%s: refused: plugin name '%s' is already used by %s (names "
                                "must be unique: set `name:` in the config)",
                                b->path, b->name, a->path);
            if (a->id != 0 && a->id == b->id)
                return spk_errf(eb, SPK_EDUPLICATE,
                                "%s: refused: plugin ID %u is already used by '%s' (%s)",
                                b->path, b->id, a->name, a->path);
        }
    }
    return 0;
}

static int check_requirements(const spk_config *cfg, const spk_plugin_set *set,
                              spk_errbuf *eb)
{
    for (size_t i = 0; i < set->n; i++) {
        const spk_plugin *p = set->v[i];
        if (p->table.dependencies == NULL)
            continue;
        for (const char *const *r = p->table.dependencies; *r != NULL; r++) {
            spk_errbuf why;
            int rc = spk_requirement_check(*r, set->v, set->n, &why);
            if (rc == 0)
                continue;
            if (rc == SPK_EREQUIRES && cfg->compatibility == SPK_COMPAT_LOOSE) {
                spk_warn("%s: plugin '%s' %s (loaded anyway: plugins.compatibility is loose)",
                         p->path, p->name, why.msg);
                continue;
            }
            return spk_errf(eb, rc, "%s: refused: plugin '%s' %s%s", p->path, p->name,
                            why.msg,
                            rc == SPK_EREQUIRES ? " (plugins.compatibility is strict)" : "");
        }
    }
    return 0;
}

void spk_plugin_key(const spk_plugin_conf *pc, char *out, size_t cap)
{
    snprintf(out, cap, "%s@%s", pc->name ? pc->name : "", pc->path ? pc->path : "");
}

static bool skipped(const spk_plugin_conf *pc, const char *const *skip, size_t n_skip)
{
    char key[512];
    spk_plugin_key(pc, key, sizeof(key));
    for (size_t i = 0; i < n_skip; i++)
        if (strcmp(skip[i], key) == 0)
            return true;
    return false;
}

/* Close every plugin of a set that was never initialised, and free it. */
static void set_close(spk_plugin_set *set)
{
    for (size_t i = set->n; i-- > 0;)
        spk_plugin_close(set->v[i]);
    free(set->v);
    set->v = NULL;
    set->n = 0;
}

/* A worker's pins are read once: each plugin runs from its private copy, so the
 * descriptors are closed (the worker holds only what it uses). */
static void release_pins(spk_config *cfg)
{
    for (size_t i = 0; i < cfg->n_plugins; i++) {
        if (cfg->plugins[i].pin_fd > 0)
            close(cfg->plugins[i].pin_fd);
        cfg->plugins[i].pin_fd = -1;
    }
}

int spk_plugin_set_load(spk_config *cfg, const spoke_host *host, spk_host_env *env,
                        spk_slot *slot, const char *const *skip, size_t n_skip,
                        spk_plugin_set *out, spk_errbuf *eb)
{
    out->v = NULL;
    out->n = 0;
    int rc = 0;
    if (!cfg->plugins_pinned) {
        /* Unsupervised (--single-process, a tool): the files are read here, under the
         * same rules as the supervisor's pins. */
        if (!cfg->strict_modes)
            spk_trust_warn_off();
        if (cfg->autoload && cfg->strict_modes &&
            (rc = spk_trust_dir(cfg->plugins_dir, eb)) != 0)
            return rc;
        if (cfg->autoload && (rc = spk_plugin_autoload(cfg, eb)) != 0)
            return rc;
    }
    for (size_t i = 0; i < cfg->n_plugins; i++) {
        const spk_plugin_conf *pc = &cfg->plugins[i];
        if (!pc->enabled)
            continue;
        if (skipped(pc, skip, n_skip)) {
            spk_warn("%s: quarantined after repeated crashes; not loaded until the next reload",
                     pc->path);
            continue;
        }
        if (out->n == SPK_PLUGINS_MAX) { /* autoload can pass plugins.list's cap */
            rc = spk_errf(eb, SPK_ECONFIG,
                          "%s: refused: more than %d plugins to load (plugins.list and "
                          "plugins.autoload); a generation runs at most %d",
                          pc->path, SPK_PLUGINS_MAX, SPK_PLUGINS_MAX);
            goto fail;
        }
        spk_plugin *p;
        if (cfg->plugins_pinned && pc->pin_fd <= 0)
            rc = spk_errf(eb, SPK_EINVAL, "%s: refused: not among the files the supervisor "
                          "read when this generation started", pc->path);
        else
            rc = plugin_open(pc->path, pc->pin_fd, cfg->strict_modes,
                             pc->has_sha256 ? pc->sha256 : NULL, host, &p, eb);
        if (rc != 0) {
            if (pc->line > 0) {
                spk_errbuf tmp = *eb;
                spk_errf(eb, rc, "%s:%d: %s", cfg->file, pc->line, tmp.msg);
            }
            goto fail;
        }
        p->conf = pc;
        p->id = pc->id;
        p->env = env;
        if (slot != NULL)
            p->slot = slot;
        p->index = (unsigned)out->n;
        if (pc->name != NULL) {
            char *nm = strdup(pc->name);
            if (nm == NULL) {
                spk_plugin_close(p);
                rc = spk_errf(eb, SPK_ENOMEM, "out of memory");
                goto fail;
            }
            free(p->name);
            p->name = nm;
            snprintf(p->log_prefix, sizeof(p->log_prefix), "plugin %s: ", p->name);
        }
        if (set_push(out, p) != 0) {
            spk_plugin_close(p);
            rc = spk_errf(eb, SPK_ENOMEM, "out of memory");
            goto fail;
        }
    }
    if ((rc = check_duplicates(out, eb)) != 0 || (rc = check_requirements(cfg, out, eb)) != 0)
        goto fail;
    release_pins(cfg);
    return 0;
fail:
    release_pins(cfg);
    set_close(out);
    return rc;
}

/* Build the init arguments from the plugin's config entry (or empty ones). */
static void fill_init_args(const spk_plugin *p, spoke_role role, spoke_init_args *a)
{
    memset(a, 0, sizeof(*a));
    a->struct_size = sizeof(*a);
    a->plugin_id = p->id;
    a->role = role;
    a->name = p->name;
    if (p->conf != NULL) {
        a->args = (const char *const *)p->conf->args;
        a->n_args = p->conf->n_args;
        a->env = (const char *const *)p->conf->env;
        a->n_env = p->conf->n_env;
        a->config = p->conf->config;
        a->n_config = p->conf->n_config;
    }
}

int spk_plugin_set_init(spk_plugin_set *set, spoke_role role, spk_errbuf *eb)
{
    for (size_t i = 0; i < set->n; i++) {
        spk_plugin *p = set->v[i];
        if (p->table.init != NULL) {
            spoke_init_args args;
            fill_init_args(p, role, &args);
            spk_slot_enter(p->slot, p->index, SPK_HOOK_INIT);
            int rc = p->table.init(&p->ctx, &args, &p->self);
            spk_slot_leave(p->slot);
            if (rc != 0)
                return spk_errf(eb, SPK_EPLUGIN_INIT,
                                "%s: refused: plugin '%s' init failed: %s (%d)", p->path,
                                p->name, spk_strerror(rc), rc);
        }
        p->initialised = true;
    }
    for (size_t i = 0; i < set->n; i++) {
        spk_plugin *p = set->v[i];
        if (p->table.on_config_loaded == NULL)
            continue;
        spk_slot_enter(p->slot, p->index, SPK_HOOK_CONFIG_LOADED);
        p->table.on_config_loaded(p->self);
        spk_slot_leave(p->slot);
    }
    return 0;
}

void spk_plugin_set_publish(const spk_plugin_set *set, struct spk_wslot *sl)
{
    size_t n = set->n < SPK_STATUS_PLUGINS ? set->n : SPK_STATUS_PLUGINS;
    for (size_t i = 0; i < n; i++) {
        const spk_plugin *p = set->v[i];
        spk_plugin_info *info = &sl->plugins[i];
        snprintf(info->name, sizeof(info->name), "%s", p->name);
        snprintf(info->version, sizeof(info->version), "%s", p->table.version);
        info->id = p->id;
        if (p->conf != NULL)
            spk_plugin_key(p->conf, info->key, sizeof(info->key));
        else
            snprintf(info->key, sizeof(info->key), "@%s", p->path);
    }
    atomic_store_explicit(&sl->n_plugins, (uint32_t)n, memory_order_release);
}
