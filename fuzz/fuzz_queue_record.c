/*
 * fuzz_queue_record.c -- the queue's record decoder (queue/record.c) on any stored record.
 *
 * Input: [flags][record]. The record is what LMDB holds as a value and the journal as a
 * record's body (struct rec_hdr, then the encoded EdgePayload). With flags bit 0 set the
 * harness first makes the header consistent (magic, wire_len, CRC), so the fuzzer reaches
 * the EdgePayload decoding instead of stopping at the CRC. Then: spk_rec_parse and
 * spk_rec_check (the LMDB read path) must agree with spk_rec_valid (the journal's), and a
 * record that passes is decoded as spoke-queue peek and the hub decode it, and checked
 * against the edge's limits (spk_queue_validate). The corpus (fuzz/corpus/queue_record)
 * holds records written by the real queue (fuzz-seeds).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "queue_int.h"

static void decode(const uint8_t *wire, size_t len)
{
    Spoke__Control__V1__EdgePayload *p = spoke__control__v1__edge_payload__unpack(NULL, len, wire);
    if (p == NULL)
        return;
    spoke_kv md[SPOKE_MAX_METADATA];
    size_t n = p->n_metadata < SPOKE_MAX_METADATA ? p->n_metadata : SPOKE_MAX_METADATA;
    for (size_t i = 0; i < n; i++) {
        md[i].key = p->metadata[i]->key;
        md[i].value = p->metadata[i]->value;
    }
    spk_queue_msg m = {.plugin_id = p->plugin_id,
                       .edge_id = p->edge_id,
                       .payload = p->payload.data,
                       .payload_len = p->payload.len,
                       .correlation_id = p->correlation_id,
                       .metadata = md,
                       .n_metadata = n,
                       .content_type = p->content_type,
                       .edge_timestamp_ms = p->edge_timestamp_ms};
    spk_errbuf eb;
    (void)spk_queue_validate(&m, &eb);
    spoke__control__v1__edge_payload__free_unpacked(p, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t len = size - 1;
    uint8_t *rec = malloc(len ? len : 1); /* exactly the value, as LMDB hands it out */
    if (rec == NULL)
        abort();
    memcpy(rec, data + 1, len);
    if ((data[0] & 1) && len >= sizeof(struct rec_hdr)) {
        struct rec_hdr h;
        memcpy(&h, rec, sizeof(h));
        h.magic = REC_MAGIC;
        h.wire_len = (uint32_t)(len - sizeof(h));
        h.crc = spk_rec_crc(&h, rec + sizeof(h), h.wire_len);
        memcpy(rec, &h, sizeof(h));
    }
    MDB_val v = {.mv_size = len, .mv_data = rec};
    struct rec_view r;
    bool ok = spk_rec_parse(&v, &r) == 0 && spk_rec_check(&r) == 0;
    if (ok != spk_rec_valid(rec, len)) {
        fprintf(stderr, "spk_rec_parse+spk_rec_check (%d) and spk_rec_valid (%d) disagree\n", ok,
                !ok);
        abort();
    }
    if (ok)
        decode(r.wire, r.h.wire_len);
    free(rec);
    return 0;
}
