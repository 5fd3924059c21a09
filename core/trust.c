/*
 * trust.c -- plugins.strict_modes: the owner and mode checks of a plugin's path (trust.h).
 *
 * One rule, in check_one(), applied to the file and to every directory up to /; the walk
 * runs on the path realpath() resolved, so a symbolic link is judged by its target (and
 * the directories above the target), never by the link's own mode.
 */
#include "trust.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

static bool trusted_owner(uid_t uid)
{
    return uid == 0 || uid == geteuid();
}

/* "PATH" or "PATH (a link to REAL)" into out[cap]. */
static void shown_name(const char *path, const char *real, char *out, size_t cap)
{
    if (strcmp(path, real) == 0)
        snprintf(out, cap, "%s", path);
    else
        snprintf(out, cap, "%s (resolves to %s)", path, real);
}

/* The rule. `what` (a resolved path with stat `st`) must have a trusted owner and be
 * writable by nobody else; `sticky_ok`: a world-writable directory with the sticky bit
 * and a trusted owner is accepted (one further up than the plugin's own directory). */
static int check_one(const char *shown, const char *what, const struct stat *st,
                     bool sticky_ok, spk_errbuf *eb)
{
    const char *kind = S_ISDIR(st->st_mode) ? "directory" : "file";
    if (!trusted_owner(st->st_uid)) {
        struct passwd *pw = getpwuid(st->st_uid);
        return spk_errf(eb, SPK_EINVAL,
                        "%s: refused: %s %s is owned by uid %u%s%s%s, not by root or the user "
                        "spoked runs as (uid %u); plugin files and the directories above them "
                        "must be (plugins.strict_modes)",
                        shown, kind, what, (unsigned)st->st_uid, pw ? " (" : "",
                        pw ? pw->pw_name : "", pw ? ")" : "", (unsigned)geteuid());
    }
    if ((st->st_mode & 022) == 0)
        return 0;
    if (sticky_ok && S_ISDIR(st->st_mode) && (st->st_mode & S_ISVTX))
        return 0;
    return spk_errf(eb, SPK_EINVAL,
                    "%s: refused: %s %s is writable by %s (mode %04o); plugin files and the "
                    "directories above them must be writable only by their owner "
                    "(plugins.strict_modes)",
                    shown, kind, what,
                    (st->st_mode & 022) == 022 ? "group and others"
                    : (st->st_mode & 020)      ? "its group"
                                               : "others",
                    (unsigned)(st->st_mode & 07777));
}

/* Check resolved path `real` (a regular file, or a directory when `is_dir`) and every
 * directory above it; *out gets real's stat. */
static int check_path(const char *shown, const char *real, bool is_dir, struct stat *out,
                      spk_errbuf *eb)
{
    if (stat(real, out) != 0)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s",
                        shown, strerror(errno));
    if (is_dir ? !S_ISDIR(out->st_mode) : !S_ISREG(out->st_mode))
        return spk_errf(eb, SPK_EINVAL, "%s: refused: %s is not a %s", shown, real,
                        is_dir ? "directory" : "regular file");
    int rc = check_one(shown, real, out, false, eb);
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", real);
    /* The plugin's own directory is held to the strict rule; those above may be sticky. */
    bool sticky_ok = is_dir;
    while (rc == 0 && strcmp(dir, "/") != 0) {
        char *slash = strrchr(dir, '/');
        if (slash == NULL)
            break; /* realpath() always returns an absolute path */
        slash[slash == dir ? 1 : 0] = '\0';
        struct stat st;
        if (stat(dir, &st) != 0)
            return spk_errf(eb, SPK_EIO, "%s: cannot check directory %s: %s", shown, dir,
                            strerror(errno));
        rc = check_one(shown, dir, &st, sticky_ok, eb);
        sticky_ok = true;
    }
    return rc;
}

static int resolve(const char *path, char real[PATH_MAX], spk_errbuf *eb)
{
    if (realpath(path, real) != NULL)
        return 0;
    return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s", path,
                    strerror(errno));
}

int spk_trust_open(const char *path, bool strict, int *fd, spk_errbuf *eb)
{
    *fd = -1;
    if (!strict) {
        int f = open(path, O_RDONLY | O_CLOEXEC);
        if (f < 0)
            return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s",
                            path, strerror(errno));
        *fd = f;
        return 0;
    }
    char real[PATH_MAX], shown[2 * PATH_MAX + 32];
    int rc = resolve(path, real, eb);
    if (rc != 0)
        return rc;
    shown_name(path, real, shown, sizeof(shown));
    struct stat want, got;
    if ((rc = check_path(shown, real, false, &want, eb)) != 0)
        return rc;
    /* Every directory above is trusted now, so nobody else can swap the file between the
     * walk and this open; the descriptor is checked again all the same. */
    int f = open(real, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (f < 0)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s",
                        shown, strerror(errno));
    if (fstat(f, &got) != 0 || got.st_dev != want.st_dev || got.st_ino != want.st_ino) {
        close(f);
        return spk_errf(eb, SPK_EINVAL, "%s: refused: the file changed while it was checked",
                        shown);
    }
    if ((rc = check_one(shown, real, &got, false, eb)) != 0) {
        close(f);
        return rc;
    }
    *fd = f;
    return 0;
}

int spk_trust_dir(const char *dir, spk_errbuf *eb)
{
    char real[PATH_MAX], shown[2 * PATH_MAX + 32];
    int rc = resolve(dir, real, eb);
    if (rc != 0)
        return rc;
    shown_name(dir, real, shown, sizeof(shown));
    struct stat st;
    return check_path(shown, real, true, &st, eb);
}

void spk_trust_warn_off(void)
{
    spk_warn("plugins.strict_modes is false: plugin files are loaded whatever their owner and "
             "modes (for development only; never in production)");
}
