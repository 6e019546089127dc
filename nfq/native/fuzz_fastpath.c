/* libFuzzer harness for the fast path's flow cache (built with AddressSanitizer and
 * UndefinedBehaviorSanitizer by tests/unit/test_native_fuzz.py): fpc_packet on any bytes.
 * The first input byte shapes the flows installed (family, directions, which orientation);
 * their addresses and ports are read from the packet itself where it is long enough, so the
 * parser's every path after the lookup is reached, not only "no flow".  The packet sits in a
 * heap block of its exact size: a read past its end is caught.  The server's data is hashed
 * into a real XXH3 state with the "\r\nDate: " field masked, from the packet's own sequence
 * number (so in order) or the byte before it; the client's data is logged into the arena. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastpath.h"
#include "xxh3.h"

static void addresses(const uint8_t *p, size_t n, uint8_t fam, uint8_t *src, uint8_t *dst, uint16_t *sport,
                      uint16_t *dport)
{
    size_t a = fam == 6 ? 8 : 12, len = fam == 6 ? 16 : 4, l4 = fam == 6 ? 40 : 20;
    memset(src, 0, 16);
    memset(dst, 0, 16);
    *sport = *dport = 0;
    if (n >= a + 2 * len) {
        memcpy(src, p + a, len);
        memcpy(dst, p + a + len, len);
    }
    if (n >= l4 + 4) {
        *sport = (uint16_t)(p[l4] << 8 | p[l4 + 1]);
        *dport = (uint16_t)(p[l4 + 2] << 8 | p[l4 + 3]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t shape = data[0];
    size_t n = size - 1;
    uint8_t *pkt = malloc(n ? n : 1);
    if (!pkt)
        return 0;
    memcpy(pkt, data + 1, n);
    if (n & 1 && n >= 40 && n < 65536) {   /* half the inputs get a length field that fits: deeper paths */
        if (pkt[0] >> 4 == 6) {
            pkt[4] = (uint8_t)((n - 40) >> 8);
            pkt[5] = (uint8_t)(n - 40);
        } else {
            pkt[2] = (uint8_t)(n >> 8);
            pkt[3] = (uint8_t)n;
        }
    }
    static struct fpc *c;   /* one cache for the run (its arena is 16 MiB), emptied after each input */
    if (!c)
        c = fpc_new(4);
    if (!c) {
        free(pkt);
        return 0;
    }
    struct fpc_flow f;
    memset(&f, 0, sizeof(f));
    f.conn_id = 7;
    f.family = (shape & 1) ? 6 : 4;
    f.dirs = (uint8_t)(1 + ((shape >> 1) % 3));      /* client, server or both */
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    addresses(pkt, n, f.family, src, dst, &sport, &dport);
    if (shape & 8) {   /* the packet is the backend's: backend = src, client = dst */
        memcpy(f.backend_addr, src, 16);
        memcpy(f.client_addr, dst, 16);
        f.backend_port = sport;
        f.client_port = dport;
    } else {           /* the client's: client = src, VIP = dst */
        memcpy(f.client_addr, src, 16);
        memcpy(f.vip, dst, 16);
        f.client_port = sport;
        f.vport = dport;
    }
    f.client.next_seq = f.server.next_seq = (uint32_t)shape * 0x01010101u;
    f.client.shift = f.server.shift = (uint8_t)((shape >> 4) % 15);
    f.client.has_ack = (shape >> 5) & 1;
    f.server.has_tsval = (shape >> 6) & 1;
    void *state = xh_new();
    size_t l4 = f.family == 6 ? 40 : 20;
    uint32_t seq = n >= l4 + 8 ? (uint32_t)pkt[l4 + 4] << 24 | (uint32_t)pkt[l4 + 5] << 16 |
                                     (uint32_t)pkt[l4 + 6] << 8 | pkt[l4 + 7] : 0;
    f.dirs |= FPC_SERVER_DATA | FPC_CLIENT_DATA;
    f.lg.base_seq = seq - (shape & 0x10 ? 100u : 0u);     /* in order, or the first 100 bytes logged */
    f.lg.end = shape & 0x10 ? 100u : 0u;
    f.lg.room = shape & 0x20 ? 50u : 1u << 20;
    f.dg.state = state;
    f.dg.base_seq = seq - (shape & 0x10 ? 65530u : 1u);   /* stream offset end: in order */
    f.dg.end = shape & 0x10 ? 65530u : 1u;
    f.dg.grid = 0;
    f.dg.limit = 1u << 31;
    f.dg.left = shape & 0x20 ? 5 : 0;
    memcpy(f.dg.pattern, "\r\nDate: ", 8);
    f.dg.plen = shape & 0x40 ? 8 : 0;
    f.dg.vlen = 29;
    if (f.dg.plen) {
        memcpy(f.dg.tail, "\r\nDat", 6);
        f.dg.ntail = 6;
    }
    int slot = fpc_install(c, &f);
    f.conn_id = 8;                     /* a second flow on other ports, so the chains hold two */
    f.client_port ^= 1;
    f.backend_port ^= 1;
    fpc_install(c, &f);
    volatile uint64_t sink = 0;
    for (int round = 0; round < 2; round++) {
        fpc_begin(c);
        sink += (uint64_t)(fpc_packet(c, pkt, (uint32_t)n) + 1);
        sink += (uint64_t)(fpc_packet(c, pkt, (uint32_t)n) + 1);
        const int32_t *touched;
        int k = fpc_touched(c, &touched);
        for (int i = 0; i < k; i++) {
            struct fpc_flow *t = fpc_flow(c, touched[i]);
            if (t)
                sink += t->client.segments + t->server.segments + t->client.window + t->server.max_window;
        }
        const struct fpc_staged *staged;
        const uint8_t *arena;
        k = fpc_staged(c, &staged, &arena);
        for (int i = 0; i < k; i++)
            for (uint32_t j = 0; j < staged[i].len; j++)
                sink += arena[staged[i].at + j];
        const struct fpc_chunk *chunks;
        k = fpc_chunks(c, &chunks);
        for (int i = 0; i < k; i++)
            sink += chunks[i].bound + chunks[i].digest[0];
        fpc_synced(c);
    }
    if (shape & 0x80)
        fpc_remove(c, slot, 7);
    sink += fpc_count(c) + fpc_stats(c)->fast;
    (void)sink;
    fpc_clear(c);
    xh_free(state);
    free(pkt);
    return 0;
}
