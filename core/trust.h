/*
 * trust.h -- which plugin files spoked trusts (plugins.strict_modes), as sshd's StrictModes.
 *
 * A plugin runs with the workers' privileges, so anyone who can change its file, or
 * replace it by renaming a directory on its path, can run code as spoked. spk_trust_open()
 * refuses a file unless (on its resolved path, symbolic links followed):
 *
 *   - the file is a regular file, and it and every directory above it up to / are owned by
 *     root or by the user spoked runs as (its effective uid), and
 *   - none of them is writable by group or others, except that a directory further up
 *     than the one holding the file may be world-writable when it has the sticky bit and
 *     a trusted owner (/tmp): there nobody else can rename or remove what they do not
 *     own, so a trusted directory below it cannot be swapped. The plugins' own directory
 *     may never be writable by others, sticky or not: a file planted there would be
 *     loaded (plugins.autoload) or at least refused, which stops the reload.
 *
 * The file is opened by its resolved path with O_NOFOLLOW and checked again through the
 * descriptor (owner, mode, same inode as the path walk saw), so what is read is what was
 * checked. A refusal names the path as configured, the path it resolves to when that
 * differs (a link), the offending file or directory and what is wrong with it.
 */
#ifndef SPK_TRUST_H
#define SPK_TRUST_H

#include <stdbool.h>

#include "err.h"

/* Open plugin file `path` for reading (O_RDONLY | O_CLOEXEC). With `strict`, refuse it
 * unless the rules above hold (SPK_EINVAL, the reason in eb); without, open it as it is.
 * On success *fd is a descriptor the caller closes. Errors: SPK_ENOENT, SPK_EIO,
 * SPK_EINVAL (untrusted). */
int spk_trust_open(const char *path, bool strict, int *fd, spk_errbuf *eb);

/* Check directory `dir` (plugins.dir before plugins.autoload reads it) by the same rules:
 * it and every directory above it. Returns 0, SPK_ENOENT, SPK_EIO or SPK_EINVAL. */
int spk_trust_dir(const char *dir, spk_errbuf *eb);

/* The warning logged once per generation when plugins.strict_modes is false. */
void spk_trust_warn_off(void);

#endif
