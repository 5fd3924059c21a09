/*
 * pbwire.h -- the few protobuf wire-format writers spoke needs by hand: where a message is
 * assembled around bytes that are already encoded (the uplink's batch request is the
 * edge's identity and then the queue's stored EdgePayloads, each as field 3), protobuf-c's
 * pack would need them decoded first. Everything else goes through protobuf-c.
 */
#ifndef SPK_PBWIRE_H
#define SPK_PBWIRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Bytes of v as a varint. */
static inline size_t spk_pb_varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* Write v as a varint at p; returns the byte after it. */
static inline uint8_t *spk_pb_put_varint(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

/* Bytes of a length-delimited field (wire type 2) `field` of `len` bytes. */
static inline size_t spk_pb_bytes_len(unsigned field, size_t len)
{
    return spk_pb_varint_len((uint64_t)field << 3 | 2) + spk_pb_varint_len(len) + len;
}

/* Write a length-delimited field (a string, bytes or an encoded message) at p. */
static inline uint8_t *spk_pb_put_bytes(uint8_t *p, unsigned field, const void *data, size_t len)
{
    p = spk_pb_put_varint(p, (uint64_t)field << 3 | 2);
    p = spk_pb_put_varint(p, len);
    memcpy(p, data, len);
    return p + len;
}

/* Write a varint field (wire type 0) at p. */
static inline uint8_t *spk_pb_put_uint(uint8_t *p, unsigned field, uint64_t v)
{
    p = spk_pb_put_varint(p, (uint64_t)field << 3);
    return spk_pb_put_varint(p, v);
}

#endif
