/* libFuzzer harness for the binding's parsers (built with AddressSanitizer and
 * UndefinedBehaviorSanitizer by tests/unit/test_native_fuzz.py):
 *  - nfqb_parse_datagram: whatever a netlink datagram holds (the kernel's packet messages, acks,
 *    errors, truncated or lying lengths, any attribute);
 *  - nfqb_tcp_checksum: any packet bytes with any TCP offset (the first two input bytes).
 * Every packet descriptor that comes out is read whole, so a descriptor pointing outside the
 * input is caught by ASan. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "nfqbind.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* a copy the parser may not read past: ASan sees the heap block's end */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    struct nfqb_pkt out[8];
    uint64_t errors = 0;
    int n = nfqb_parse_datagram(buf, size, out, 8, &errors);
    volatile uint32_t sink = 0;
    for (int i = 0; i < n; i++) {
        for (uint32_t j = 0; j < out[i].len; j++)
            sink += out[i].data[j];
        sink += out[i].id + out[i].mark + out[i].skbinfo + out[i].orig_len;
    }
    if (size >= 2) {
        size_t l4off = ((size_t)data[0] << 8 | data[1]);
        nfqb_tcp_checksum(buf + 2, size - 2, l4off);
    }
    (void)sink;
    free(buf);
    return 0;
}
