/*
 * crc32c.h -- CRC-32C (Castagnoli), the checksum of every queue record.
 *
 * Both functions update a raw CRC register: start from 0xFFFFFFFF and invert the
 * result for the standard CRC-32C (of "123456789": 0xE3069283). A register can be
 * carried across calls: spk_crc32c(spk_crc32c(c, a, n), b, m) is the CRC of a then b.
 *
 * spk_crc32c() uses the CPU's CRC-32C instruction where there is one (x86-64 SSE4.2,
 * ARMv8 CRC), on three interleaved streams for buffers of a few hundred bytes and more
 * (the instruction's latency is three times its throughput), and the portable code
 * otherwise. spk_crc32c_portable() is the table-driven code (slicing by 8) alone, for
 * CPUs without the instruction and for the tests that check one against the other.
 * Both are thread-safe; neither allocates.
 */
#ifndef SPK_CRC32C_H
#define SPK_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t spk_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t spk_crc32c_portable(uint32_t crc, const void *data, size_t n);

/* Which code spk_crc32c() runs on this CPU: "sse4.2", "armv8-crc" or "portable". */
const char *spk_crc32c_impl(void);

#endif
