/* The appliance's NFQUEUE binding: see nfqbind.c for the theory of operation.
 * This header is also the cffi declaration (nfq/native/build.py reads it between the marks). */
#ifndef NFQBIND_H
#define NFQBIND_H
#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
struct nfqb;

struct nfqb_pkt {
    uint32_t id;
    uint32_t mark;
    uint32_t len;            /* bytes copied to us */
    uint32_t orig_len;       /* the packet's length (more than len: a truncated copy) */
    uint32_t skbinfo;        /* NFQA_SKB_INFO: 1 checksum not ready, 2 GSO */
    uint16_t hw_protocol;
    uint8_t hook;
    const unsigned char *data;
    /* the decision (nfqb_decide) */
    int verdict;
    int64_t set_mark;        /* -1: leave the mark */
    unsigned char *new_data; /* accept with these bytes */
    uint32_t new_len;
};

struct nfqb_stats {
    uint64_t received;
    uint64_t gso_packets;
    uint64_t enobufs;
    uint64_t recv_errors;
    uint64_t parse_errors;
    uint64_t verdicts;
    uint64_t batch_verdicts;
    uint64_t verdict_errors;
};

struct nfqb *nfqb_open(uint16_t queue, uint32_t copy_range, uint32_t flags, uint32_t maxlen, int sockbuf,
                       int batch, char *err, size_t errlen);
int nfqb_fileno(const struct nfqb *q);
const struct nfqb_stats *nfqb_stats(const struct nfqb *q);
struct nfqb_pkt *nfqb_packets(struct nfqb *q);
int nfqb_recv(struct nfqb *q, int max);
int nfqb_decide(struct nfqb *q, int i, int verdict, unsigned char *payload, uint32_t len, int64_t set_mark);
int nfqb_commit(struct nfqb *q, int from, int to);
void nfqb_close(struct nfqb *q);

int nfqb_parse_datagram(const void *buf, size_t len, struct nfqb_pkt *out, int max, uint64_t *errors);
int nfqb_tcp_checksum(unsigned char *pkt, size_t len, size_t l4off);
/* cffi-end */
#endif
