/*
 * fs.h -- file-system helpers every part uses.
 */
#ifndef SPK_FS_H
#define SPK_FS_H

#include <sys/types.h>

/* Create directory `path` and its missing parents with `mode` (existing ones are left as
 * they are). Returns 0, or the errno of what failed: ENAMETOOLONG for a path of PATH_MAX
 * bytes or more (never cut short), EINVAL for an empty one. */
int spk_mkdir_p(const char *path, mode_t mode);

#endif
