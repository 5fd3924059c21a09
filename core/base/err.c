/*
 * err.c -- names of spoke's error codes and the operator message buffer.
 */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>

const char *spk_strerror(int err)
{
    switch (err) {
    case SPK_OK: return "success";
    case SPK_EINVAL: return "invalid argument";
    case SPK_ENOMEM: return "out of memory";
    case SPK_EUNSUPPORTED: return "not supported here";
    case SPK_EPAYLOAD_TOO_LARGE: return "payload too large (limit 1 MiB)";
    case SPK_ETOO_MANY_METADATA: return "too many metadata entries (limit 50)";
    case SPK_EMETADATA_KEY: return "metadata key too long (limit 256 bytes)";
    case SPK_EMETADATA_VALUE: return "metadata value too long (limit 4096 bytes)";
    case SPK_ECORRELATION_ID: return "correlation ID too long (limit 256 bytes)";
    case SPK_EQUEUE_FULL: return "queue full";
    case SPK_EQUEUE_UNAVAILABLE: return "queue unavailable";
    case SPK_ENOT_JSON: return "not well-formed JSON";
    case SPK_ENOT_FOUND: return "no such key";
    case SPK_EKV_UNAVAILABLE: return "KV store unavailable";
    case SPK_EIO: return "I/O error";
    case SPK_ECONFIG: return "invalid configuration";
    case SPK_ENOENT: return "not found";
    case SPK_EDLOPEN: return "cannot load shared object";
    case SPK_EABI: return "incompatible plugin ABI";
    case SPK_ECHECKSUM: return "checksum mismatch";
    case SPK_EDUPLICATE: return "duplicate plugin";
    case SPK_EREQUIRES: return "plugin requirement not met";
    case SPK_EPLUGIN_INIT: return "plugin init failed";
    case SPK_ECORRUPT: return "corrupt data";
    case SPK_EBUSY: return "busy";
    case SPK_ETIMEOUT: return "timed out";
    }
    return "unknown error";
}

int spk_errf(spk_errbuf *eb, int err, const char *fmt, ...)
{
    if (eb != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(eb->msg, sizeof(eb->msg), fmt, ap);
        va_end(ap);
    }
    return err;
}
