/* libFuzzer harness for the fast path's flow cache (built with AddressSanitizer and
 * UndefinedBehaviorSanitizer by tests/unit/test_native_fuzz.py): fpc_packet on any bytes.
 * The first input byte shapes the flows installed (family, directions, which orientation);
 * their addresses and ports are read from the packet itself where it is long enough, so the
 * parser's every path after the lookup is reached, not only "no flow".  The packet sits in a
 * heap block of its exact size: a read past its end is caught. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastpath.h"

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
    struct fpc *c = fpc_new(4);
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
        fpc_synced(c);
    }
    if (shape & 0x80)
        fpc_remove(c, slot, 7);
    else
        fpc_clear(c);
    sink += fpc_count(c) + fpc_stats(c)->fast;
    (void)sink;
    fpc_free(c);
    free(pkt);
    return 0;
}
