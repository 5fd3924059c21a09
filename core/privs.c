/*
 * privs.c -- the workers' account (privs.h).
 */
#include "privs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fs.h"

int spk_privs_resolve(const spk_config *cfg, spk_privs *out, spk_errbuf *eb)
{
    memset(out, 0, sizeof(*out));
    uid_t euid = geteuid();
    if (cfg->user == NULL && cfg->group == NULL) {
        if (euid == 0)
            return spk_errf(eb, SPK_ECONFIG,
                            "%s: user: not set, and spoked runs as root: workers would run "
                            "plugins as root. Set `user:` to the unprivileged account the "
                            "workers run as (or `user: root` to run plugins as root, not "
                            "recommended)",
                            cfg->file);
        return 0;
    }
    const char *name = cfg->user;
    struct passwd *pw = name ? getpwnam(name) : getpwuid(euid);
    if (pw == NULL)
        return spk_errf(eb, SPK_ECONFIG, "%s: user: no such user '%s'", cfg->file,
                        name ? name : "(the current one)");
    out->uid = pw->pw_uid;
    out->gid = pw->pw_gid;
    snprintf(out->user, sizeof(out->user), "%s", pw->pw_name);
    if (cfg->group != NULL) {
        struct group *gr = getgrnam(cfg->group);
        if (gr == NULL)
            return spk_errf(eb, SPK_ECONFIG, "%s: group: no such group '%s'", cfg->file,
                            cfg->group);
        out->gid = gr->gr_gid;
    }
    if (euid == 0) {
        out->change = true;
        return 0;
    }
    /* Unprivileged: only the account it already has. */
    if (out->uid != euid || (cfg->group != NULL && out->gid != getegid()))
        return spk_errf(eb, SPK_ECONFIG,
                        "%s: %s: switching the workers to %s%s%s needs spoked started as "
                        "root (it runs as uid %u)",
                        cfg->file, cfg->group && out->uid == euid ? "group" : "user",
                        out->user, cfg->group ? ":" : "", cfg->group ? cfg->group : "",
                        (unsigned)euid);
    return 0;
}

int spk_privs_drop(const spk_privs *p, spk_errbuf *eb)
{
    if (!p->change)
        return 0;
    int pdeath = 0;
    prctl(PR_GET_PDEATHSIG, &pdeath);
    if (setgroups(1, &p->gid) != 0)
        return spk_errf(eb, SPK_EIO, "setgroups(%u): %s", (unsigned)p->gid, strerror(errno));
    if (setgid(p->gid) != 0)
        return spk_errf(eb, SPK_EIO, "setgid(%u): %s", (unsigned)p->gid, strerror(errno));
    if (setuid(p->uid) != 0)
        return spk_errf(eb, SPK_EIO, "setuid(%u) (user %s): %s", (unsigned)p->uid, p->user,
                        strerror(errno));
    /* Verify, as the calls can succeed partly: every id is the target, and root's cannot
     * be had back. */
    uid_t r, e, s;
    gid_t rg, eg, sg;
    if (getresuid(&r, &e, &s) != 0 || r != p->uid || e != p->uid || s != p->uid ||
        getresgid(&rg, &eg, &sg) != 0 || rg != p->gid || eg != p->gid || sg != p->gid ||
        (p->uid != 0 && setuid(0) == 0))
        return spk_errf(eb, SPK_EIO, "dropping privileges to user %s (uid %u, gid %u) did not "
                        "hold", p->user, (unsigned)p->uid, (unsigned)p->gid);
    if (pdeath != 0)
        prctl(PR_SET_PDEATHSIG, pdeath);
    return 0;
}

int spk_privs_apply(const spk_config *cfg, spk_errbuf *eb)
{
    spk_privs p;
    int rc = spk_privs_resolve(cfg, &p, eb);
    return rc != 0 ? rc : spk_privs_drop(&p, eb);
}

int spk_privs_hand_over(const spk_privs *p, const char *dir, spk_errbuf *eb)
{
    if (!p->change || p->uid == 0 || dir == NULL)
        return 0;
    /* Missing parents are made searchable (0755), or the workers could not reach `dir`;
     * `dir` itself is private (0700). Existing directories are left as they are. */
    char parent[PATH_MAX];
    snprintf(parent, sizeof(parent), "%s", dir);
    char *slash = strrchr(parent, '/');
    int err = 0;
    if (slash != NULL && slash != parent) {
        *slash = '\0';
        err = spk_mkdir_p(parent, 0755);
    }
    if (err == 0 && mkdir(dir, 0700) != 0 && errno != EEXIST)
        err = errno;
    if (err != 0)
        return spk_errf(eb, SPK_EIO, "%s: %s", dir, strerror(err));
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return spk_errf(eb, SPK_EIO, "%s: %s", dir, strerror(errno));
    int rc = 0;
    if (fchown(dfd, p->uid, p->gid) != 0)
        rc = spk_errf(eb, SPK_EIO, "chown %s to %s: %s", dir, p->user, strerror(errno));
    int dup_fd = rc == 0 ? fcntl(dfd, F_DUPFD_CLOEXEC, 0) : -1;
    DIR *d = dup_fd >= 0 ? fdopendir(dup_fd) : NULL;
    if (rc == 0 && d == NULL) {
        rc = spk_errf(eb, SPK_EIO, "%s: %s", dir, strerror(errno));
        if (dup_fd >= 0)
            close(dup_fd);
    }
    struct dirent *de;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        struct stat st;
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0 ||
            fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (fchownat(dfd, de->d_name, p->uid, p->gid, AT_SYMLINK_NOFOLLOW) != 0)
            rc = spk_errf(eb, SPK_EIO, "chown %s/%s to %s: %s", dir, de->d_name, p->user,
                          strerror(errno));
    }
    if (d != NULL)
        closedir(d);
    close(dfd);
    return rc;
}
