/*
 * err.h -- spoke's internal error codes.
 *
 * Every internal function returns 0 or a negative spk_err. The codes from -1 to -99 are
 * the public spoke_status codes of abi/spoke.h (same values, so a host service can return
 * an internal result unchanged); codes from -100 down are internal to the host.
 * spk_strerror() names any of them. A message for the operator (file, line, plugin, key)
 * is carried separately, in an spk_errbuf filled by the failing function.
 */
#ifndef SPK_ERR_H
#define SPK_ERR_H

#include <stddef.h>

#include "spoke.h"

enum spk_err {
    SPK_OK = 0,
    SPK_EINVAL = SPOKE_ERR_INVALID,
    SPK_ENOMEM = SPOKE_ERR_NOMEM,
    SPK_EUNSUPPORTED = SPOKE_ERR_UNSUPPORTED,
    SPK_EPAYLOAD_TOO_LARGE = SPOKE_ERR_PAYLOAD_TOO_LARGE,
    SPK_ETOO_MANY_METADATA = SPOKE_ERR_TOO_MANY_METADATA,
    SPK_EMETADATA_KEY = SPOKE_ERR_METADATA_KEY_TOO_LONG,
    SPK_EMETADATA_VALUE = SPOKE_ERR_METADATA_VALUE_TOO_LONG,
    SPK_ECORRELATION_ID = SPOKE_ERR_CORRELATION_ID_TOO_LONG,
    SPK_EQUEUE_FULL = SPOKE_ERR_QUEUE_FULL,
    SPK_EQUEUE_UNAVAILABLE = SPOKE_ERR_QUEUE_UNAVAILABLE,
    SPK_ENOT_JSON = SPOKE_ERR_NOT_JSON,
    SPK_ENOT_FOUND = SPOKE_ERR_NOT_FOUND,           /* the KV services' "no such key" */
    SPK_EKV_UNAVAILABLE = SPOKE_ERR_KV_UNAVAILABLE, /* the KV services' store is missing,
                                                       full or failing */

    SPK_EIO = -100,        /* a system call failed; errno is in the message */
    SPK_ECONFIG = -101,    /* the configuration is invalid */
    SPK_ENOENT = -102,     /* a file or an entry does not exist */
    SPK_EDLOPEN = -103,    /* dlopen or dlsym failed */
    SPK_EABI = -104,       /* plugin ABI version or table is not acceptable */
    SPK_ECHECKSUM = -105,  /* plugin file's SHA-256 differs from the configured one */
    SPK_EDUPLICATE = -106, /* two plugins with the same name or ID */
    SPK_EREQUIRES = -107,  /* a plugin's requirement on another plugin is not met */
    SPK_EPLUGIN_INIT = -108, /* a plugin's init returned an error */
    SPK_ECORRUPT = -109,   /* stored or received data does not decode */
    SPK_EBUSY = -110,      /* resource in use (e.g. another instance runs) */
    SPK_ETIMEOUT = -111,   /* an operation did not complete in time */
};

/* Name of an spk_err or spoke_status code; never NULL. */
const char *spk_strerror(int err);

/* An operator-facing message buffer. Functions that can fail with context take one and
 * fill it with a complete sentence ("plugins.yaml:12: key 'plugins.hook_timeout': ...").
 * A NULL spk_errbuf pointer is allowed and means "no message wanted". */
typedef struct spk_errbuf {
    char msg[1024];
} spk_errbuf;

/* printf into eb (if eb is not NULL); returns `err` so callers can `return spk_errf(...)`. */
int spk_errf(spk_errbuf *eb, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
