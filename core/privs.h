/*
 * privs.h -- the account the workers run as (top-level `user:` and `group:`), as nginx's
 * `user` directive.
 *
 * The supervisor keeps its privileges: it binds the listeners, opens the status region,
 * the config snapshot and the plugin files, and only then forks workers; each worker
 * drops to `user:`/`group:` (setgroups to the one group, setgid, setuid, in that order,
 * each checked, and the result verified) before it opens its stores or loads a plugin.
 * The uplink (no plugin code) keeps the supervisor's account.
 *
 * The rule: a worker never runs plugins as root unless the config says so. spoked started
 * as root refuses a config with no `user:` (write `user: root` to run plugins as root);
 * started as another user, `user:` may only name that user (nothing to switch), and
 * without it the workers run as that user.
 */
#ifndef SPK_PRIVS_H
#define SPK_PRIVS_H

#include <stdbool.h>
#include <sys/types.h>

#include "config.h"
#include "err.h"

typedef struct spk_privs {
    bool change;    /* switch to uid/gid; false: keep the process's account */
    uid_t uid;
    gid_t gid;
    char user[64];  /* for messages */
} spk_privs;

/* Decide the workers' account from cfg's `user:` and `group:` and the process's own (the
 * rule above). Returns 0, or SPK_ECONFIG with a message naming the key (no such user or
 * group, root without `user:`, a switch an unprivileged process cannot make). */
int spk_privs_resolve(const spk_config *cfg, spk_privs *out, spk_errbuf *eb);

/* Switch this process to p's account (nothing when !p->change). The parent-death signal,
 * which the kernel clears on a change of credentials, is set again. Returns 0 or SPK_EIO
 * naming the call that failed. */
int spk_privs_drop(const spk_privs *p, spk_errbuf *eb);

/* spk_privs_resolve() then spk_privs_drop(): what a worker does before loading plugins. */
int spk_privs_apply(const spk_config *cfg, spk_errbuf *eb);

/* Give directory `dir` and the files directly in it (not following links) to p's account,
 * creating `dir` (0700) and its missing parents (0755) first, so that workers that
 * dropped privileges can use a store the supervisor created (the queue, the KV store, the
 * hub store). Nothing when !p->change or p->uid is root. Returns 0 or SPK_EIO naming the
 * path. */
int spk_privs_hand_over(const spk_privs *p, const char *dir, spk_errbuf *eb);

#endif
