/*
 * pin.c -- a generation's plugin files (pin.h).
 */
#include "pin.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader.h"
#include "trust.h"

#define SEALS (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)

/* Copy `in` into a new sealed memfd; returns it or a negative spk_err. */
static int sealed_copy(int in, const char *path, spk_errbuf *eb)
{
    const char *base = strrchr(path, '/');
    char name[256];
    snprintf(name, sizeof(name), "spoke-pin:%s", base ? base + 1 : path);
    int mfd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0)
        return spk_errf(eb, SPK_EIO, "%s: memfd_create: %s", path, strerror(errno));
    char buf[65536];
    for (;;) {
        ssize_t n = read(in, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            spk_errf(eb, SPK_EIO, "cannot read %s: %s", path, strerror(errno));
            goto fail;
        }
        if (n == 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(mfd, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                spk_errf(eb, SPK_EIO, "cannot copy %s: %s", path, strerror(errno));
                goto fail;
            }
            off += w;
        }
    }
    if (fcntl(mfd, F_ADD_SEALS, SEALS) != 0) {
        spk_errf(eb, SPK_EIO, "%s: sealing its copy: %s", path, strerror(errno));
        goto fail;
    }
    return mfd;
fail:
    close(mfd);
    return SPK_EIO;
}

static int push(spk_pins *p, const char *path, int fd)
{
    spk_pin *nv = realloc(p->v, (p->n + 1) * sizeof(*nv));
    if (nv == NULL)
        return SPK_ENOMEM;
    p->v = nv;
    if ((nv[p->n].path = strdup(path)) == NULL)
        return SPK_ENOMEM;
    nv[p->n].fd = fd;
    p->n++;
    return 0;
}

int spk_pins_take(spk_config *cfg, spk_pins *out, spk_errbuf *eb)
{
    out->v = NULL;
    out->n = 0;
    int rc = 0;
    if (!cfg->strict_modes)
        spk_trust_warn_off();
    if (cfg->autoload && cfg->strict_modes && (rc = spk_trust_dir(cfg->plugins_dir, eb)) != 0)
        return rc;
    if (cfg->autoload && (rc = spk_plugin_autoload(cfg, eb)) != 0)
        return rc;
    for (size_t i = 0; i < cfg->n_plugins; i++) {
        const spk_plugin_conf *pc = &cfg->plugins[i];
        if (!pc->enabled)
            continue;
        int in, mfd = -1;
        rc = spk_trust_open(pc->path, cfg->strict_modes, &in, eb);
        if (rc == 0) {
            mfd = sealed_copy(in, pc->path, eb);
            close(in);
            rc = mfd < 0 ? mfd : 0;
        }
        if (rc == 0 && push(out, pc->path, mfd) != 0) {
            close(mfd);
            rc = spk_errf(eb, SPK_ENOMEM, "out of memory");
        }
        if (rc != 0) {
            if (pc->line > 0) {
                spk_errbuf tmp = *eb;
                spk_errf(eb, rc, "%s:%d: %s", cfg->file, pc->line, tmp.msg);
            }
            spk_pins_free(out);
            return rc;
        }
    }
    return 0;
}

int spk_pins_dup(const spk_pins *src, spk_pins *out)
{
    out->v = NULL;
    out->n = 0;
    for (size_t i = 0; i < src->n; i++) {
        int fd = fcntl(src->v[i].fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0 || push(out, src->v[i].path, fd) != 0) {
            if (fd >= 0)
                close(fd);
            spk_pins_free(out);
            return fd < 0 ? SPK_EIO : SPK_ENOMEM;
        }
    }
    return 0;
}

void spk_pins_free(spk_pins *p)
{
    for (size_t i = 0; i < p->n; i++) {
        close(p->v[i].fd);
        free(p->v[i].path);
    }
    free(p->v);
    p->v = NULL;
    p->n = 0;
}

int spk_pins_apply(spk_config *cfg, const int *fds, char *const *paths, size_t n,
                   spk_errbuf *eb)
{
    for (size_t k = 0; k < n; k++) {
        spk_plugin_conf *pc = NULL;
        for (size_t i = 0; i < cfg->n_plugins && pc == NULL; i++)
            if (cfg->plugins[i].enabled && cfg->plugins[i].pin_fd == 0 &&
                strcmp(cfg->plugins[i].path, paths[k]) == 0)
                pc = &cfg->plugins[i];
        if (pc == NULL) {
            /* Not listed: the supervisor autoloaded it from plugins.dir. */
            const char *base = strrchr(paths[k], '/');
            if (spk_config_add_autoload(cfg, base ? base + 1 : paths[k], paths[k]) != 0)
                return spk_errf(eb, SPK_ENOMEM, "out of memory");
            pc = &cfg->plugins[cfg->n_plugins - 1];
        }
        pc->pin_fd = fds[k];
    }
    cfg->plugins_pinned = true;
    return 0;
}
