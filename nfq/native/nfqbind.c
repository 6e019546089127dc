/* The appliance's own NFQUEUE binding (nfq/native): batched receive, batched verdicts, GSO.
 *
 * Theory of operation
 * -------------------
 * One `struct nfqb` is one queue bound on its own netlink socket (libmnl), with the copy mode
 * set to whole packets up to the kernel's maximum (0xffff - NLA_HDRLEN), NFQA_CFG_F_GSO (the
 * kernel queues a GSO super-packet whole: one verdict per up to 64 KiB instead of one per
 * segment) and, per the appliance's policy, NFQA_CFG_F_FAIL_OPEN, and socket buffers of the
 * caller's size (SO_RCVBUFFORCE/SO_SNDBUFFORCE: the appliance runs as root).
 *
 * nfqb_recv reads up to `max` queued packets with one recvmmsg() call (non-blocking) into
 * buffers owned by the queue, and parses each with nfqb_parse_datagram (pure: bytes in, packet
 * descriptors out; the fuzzing harness drives it).  An ENOBUFS from the socket means the kernel
 * could not deliver packets to us (the socket buffer was full): it is counted, never hidden; the
 * kernel dropped those packets or, with FAIL_OPEN, accepted them (/proc/net/netfilter/
 * nfnetlink_queue counts them too).  Every received packet starts with the decision "accept
 * unchanged"; the caller changes that with nfqb_decide (drop, accept with these bytes, set a
 * mark) and then nfqb_commit sends the verdicts of packets [from, to): runs of plain accepts
 * become one NFQNL_MSG_VERDICT_BATCH (it accepts every queued packet with an id up to the last
 * of the run; the ones before the run already have their verdict), every other packet its own
 * NFQNL_MSG_VERDICT, all appended to one send buffer and sent with as few sendto() calls as fit
 * (netlink processes the messages of one datagram in order).
 *
 * A packet the kernel marked NFQA_SKB_CSUMNOTREADY (a GSO super-packet, or any packet whose TCP
 * checksum the hardware would finish) carries only the pseudo-header seed in its checksum
 * field.  The caller completes its copy with nfqb_tcp_checksum (given the TCP header's offset,
 * which its parser knows) before it looks at it: it may keep the bytes to send them again, and
 * when it rewrites the packet the kernel takes the new bytes as complete (nfqnl_mangle sets
 * CHECKSUM_NONE).
 *
 * Nothing here allocates after nfqb_open; nothing trusts a length it did not check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#include "nfqbind.h"

#define NFQB_COPY_MAX (0xffff - 4)        /* NFQNL_MAX_COPY_RANGE: 0xffff - NLA_HDRLEN */
#define NFQB_RXBUF (NFQB_COPY_MAX + 1024)  /* one packet message: its payload plus metadata */
#define NFQB_TXBUF (1024 * 1024)

struct nfqb {
    struct mnl_socket *nl;
    int fd;
    uint16_t queue;
    uint32_t portid;
    int batch;
    unsigned char *rx;          /* batch * NFQB_RXBUF */
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct nfqb_pkt *pkts;      /* batch */
    unsigned char *tx;
    size_t txlen;
    struct nfqb_stats stats;
};

/* --- parsing (pure) ---------------------------------------------------------------------- */

static int parse_packet_msg(const struct nlmsghdr *nlh, struct nfqb_pkt *p)
{
    struct nlattr *attr[NFQA_MAX + 1];
    memset(attr, 0, sizeof(attr));
    if (nfq_nlmsg_parse(nlh, attr) < 0)
        return -1;
    /* libmnl walks attributes up to the message's *aligned* end, but the kernel sends the last
     * message of a datagram unpadded (nlmsg_len = the payload's exact end): an attribute must end
     * within nlmsg_len, or it would describe bytes past what was received (the fuzzer found it) */
    const char *end = (const char *)nlh + nlh->nlmsg_len;
    for (int i = 0; i <= NFQA_MAX; i++)
        if (attr[i] && (const char *)mnl_attr_get_payload(attr[i]) + mnl_attr_get_payload_len(attr[i]) > end)
            return -1;
    if (!attr[NFQA_PACKET_HDR] || mnl_attr_get_payload_len(attr[NFQA_PACKET_HDR]) < sizeof(struct nfqnl_msg_packet_hdr))
        return -1;
    const struct nfqnl_msg_packet_hdr *ph = mnl_attr_get_payload(attr[NFQA_PACKET_HDR]);
    uint32_t id_be;
    uint16_t proto_be;
    memcpy(&id_be, &ph->packet_id, 4);   /* the attribute payload is only 4-byte aligned */
    memcpy(&proto_be, &ph->hw_protocol, 2);
    memset(p, 0, sizeof(*p));
    p->id = ntohl(id_be);
    p->hw_protocol = ntohs(proto_be);
    p->hook = ph->hook;
    if (attr[NFQA_MARK]) {
        if (mnl_attr_get_payload_len(attr[NFQA_MARK]) < 4)
            return -1;
        p->mark = ntohl(mnl_attr_get_u32(attr[NFQA_MARK]));
    }
    if (attr[NFQA_SKB_INFO]) {
        if (mnl_attr_get_payload_len(attr[NFQA_SKB_INFO]) < 4)
            return -1;
        p->skbinfo = ntohl(mnl_attr_get_u32(attr[NFQA_SKB_INFO]));
    }
    if (attr[NFQA_PAYLOAD]) {
        p->data = mnl_attr_get_payload(attr[NFQA_PAYLOAD]);
        p->len = mnl_attr_get_payload_len(attr[NFQA_PAYLOAD]);
    }
    p->orig_len = p->len;
    if (attr[NFQA_CAP_LEN]) {
        if (mnl_attr_get_payload_len(attr[NFQA_CAP_LEN]) < 4)
            return -1;
        uint32_t cap = ntohl(mnl_attr_get_u32(attr[NFQA_CAP_LEN]));
        if (cap > p->len)
            p->orig_len = cap;
    }
    p->verdict = NF_ACCEPT;
    p->set_mark = -1;
    return 0;
}

int nfqb_parse_datagram(const void *buf, size_t len, struct nfqb_pkt *out, int max, uint64_t *errors)
{
    /* the walk is ours, not mnl_nlmsg_ok/next: those compare a length cast to int, and a message
     * claiming 2**31 bytes or more passed them (found by the fuzzing harness) */
    int n = 0;
    size_t off = 0;
    while (len - off >= sizeof(struct nlmsghdr)) {
        const struct nlmsghdr *nlh = (const struct nlmsghdr *)((const char *)buf + off);
        uint32_t mlen = nlh->nlmsg_len;
        if (mlen < sizeof(struct nlmsghdr) || mlen > len - off) {
            (*errors)++;   /* a length that lies: the rest of the datagram is not trusted */
            return n;
        }
        uint16_t type = nlh->nlmsg_type;
        if (type == NLMSG_ERROR || type == NLMSG_DONE || type == NLMSG_NOOP) {
            /* an ack or error for a config message; verdicts ask for none */
            if (type == NLMSG_ERROR)
                (*errors)++;
        } else if (NFNL_SUBSYS_ID(type) == NFNL_SUBSYS_QUEUE && NFNL_MSG_TYPE(type) == NFQNL_MSG_PACKET
                   && n < max && mlen >= NLMSG_LENGTH(sizeof(struct nfgenmsg))
                   && parse_packet_msg(nlh, &out[n]) == 0) {
            n++;
        } else {
            (*errors)++;
        }
        size_t step = NLMSG_ALIGN(mlen);
        off += step < len - off ? step : len - off;
    }
    if (off < len)
        (*errors)++;   /* trailing bytes that are not a whole message */
    return n;
}

/* --- the TCP checksum, whole ----------------------------------------------------------------- */

static uint64_t sum_bytes(const unsigned char *p, size_t n, uint64_t acc)
{
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        acc += (uint64_t)a + b;
        p += 8;
        n -= 8;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        n -= 2;
    }
    if (n) {
        uint16_t w = 0;
        memcpy(&w, p, 1);   /* the odd byte is the high byte of a big-endian word */
        acc += w;
    }
    return acc;
}

static uint16_t fold(uint64_t acc)
{
    while (acc >> 16)
        acc = (acc & 0xffff) + (acc >> 16);
    return (uint16_t)acc;
}

int nfqb_tcp_checksum(unsigned char *pkt, size_t len, size_t l4off)
{
    if (len < 1 || l4off + 20 > len)
        return -1;
    int version = pkt[0] >> 4;
    uint64_t acc = 0;
    size_t l4len = len - l4off;
    if (version == 4) {
        if (len < 20 || l4off < 20)
            return -1;
        acc = sum_bytes(pkt + 12, 8, acc);   /* source and destination */
    } else if (version == 6) {
        if (len < 40 || l4off < 40)
            return -1;
        acc = sum_bytes(pkt + 8, 32, acc);
    } else {
        return -1;
    }
    if (l4len > 0xffff && version == 4)
        return -1;
    acc += htons(IPPROTO_TCP);
    acc += htonl((uint32_t)l4len) >> 16;   /* the length as a 32-bit big-endian value: both halves */
    acc += htonl((uint32_t)l4len) & 0xffff;
    pkt[l4off + 16] = 0;
    pkt[l4off + 17] = 0;
    acc = sum_bytes(pkt + l4off, l4len, acc);
    uint16_t c = (uint16_t)~fold(acc);
    memcpy(pkt + l4off + 16, &c, 2);
    return 0;
}

/* --- the queue ----------------------------------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *what)
{
    if (err && errlen)
        snprintf(err, errlen, "%s: %s", what, strerror(errno));
}

static int config(struct nfqb *q, int with_params, uint32_t copy_range, uint32_t flags, uint32_t mask,
                  uint32_t maxlen, uint8_t cmd)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, q->queue);
    nlh->nlmsg_flags |= NLM_F_ACK;
    if (cmd != NFQNL_CFG_CMD_NONE)
        nfq_nlmsg_cfg_put_cmd(nlh, AF_UNSPEC, cmd);
    if (with_params) {
        nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_PACKET, (int)copy_range);
        nfq_nlmsg_cfg_put_qmaxlen(nlh, maxlen);
        mnl_attr_put_u32(nlh, NFQA_CFG_MASK, htonl(mask));
        mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, htonl(flags));
    }
    if (mnl_socket_sendto(q->nl, nlh, nlh->nlmsg_len) < 0)
        return -1;
    /* the ack (or the error); packets cannot arrive before the bind's ack */
    for (;;) {
        ssize_t r = mnl_socket_recvfrom(q->nl, buf, sizeof(buf));
        if (r < 0)
            return -1;
        int rc = mnl_cb_run(buf, (size_t)r, 0, q->portid, NULL, NULL);
        if (rc == MNL_CB_ERROR)
            return -1;
        if (rc == MNL_CB_STOP || rc == MNL_CB_OK)
            return 0;
    }
}

struct nfqb *nfqb_open(uint16_t queue, uint32_t copy_range, uint32_t flags, uint32_t maxlen, int sockbuf,
                       int batch, char *err, size_t errlen)
{
    if (batch < 1 || batch > 4096) {
        errno = EINVAL;
        set_err(err, errlen, "batch must be 1..4096");
        return NULL;
    }
    if (copy_range == 0 || copy_range > NFQB_COPY_MAX)
        copy_range = NFQB_COPY_MAX;
    struct nfqb *q = calloc(1, sizeof(*q));
    if (!q) {
        set_err(err, errlen, "calloc");
        return NULL;
    }
    q->queue = queue;
    q->batch = batch;
    q->rx = malloc((size_t)batch * NFQB_RXBUF);
    q->msgs = calloc((size_t)batch, sizeof(*q->msgs));
    q->iov = calloc((size_t)batch, sizeof(*q->iov));
    q->pkts = calloc((size_t)batch, sizeof(*q->pkts));
    q->tx = malloc(NFQB_TXBUF);
    if (!q->rx || !q->msgs || !q->iov || !q->pkts || !q->tx) {
        set_err(err, errlen, "malloc");
        nfqb_close(q);
        return NULL;
    }
    q->nl = mnl_socket_open(NETLINK_NETFILTER);
    if (!q->nl) {
        set_err(err, errlen, "netlink socket");
        nfqb_close(q);
        return NULL;
    }
    if (mnl_socket_bind(q->nl, 0, MNL_SOCKET_AUTOPID) < 0) {
        set_err(err, errlen, "netlink bind");
        nfqb_close(q);
        return NULL;
    }
    q->fd = mnl_socket_get_fd(q->nl);
    q->portid = mnl_socket_get_portid(q->nl);
    if (sockbuf > 0) {
        if (setsockopt(q->fd, SOL_SOCKET, SO_RCVBUFFORCE, &sockbuf, sizeof(sockbuf)) < 0)
            setsockopt(q->fd, SOL_SOCKET, SO_RCVBUF, &sockbuf, sizeof(sockbuf));
        if (setsockopt(q->fd, SOL_SOCKET, SO_SNDBUFFORCE, &sockbuf, sizeof(sockbuf)) < 0)
            setsockopt(q->fd, SOL_SOCKET, SO_SNDBUF, &sockbuf, sizeof(sockbuf));
    }
    uint32_t mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO;
    if (config(q, 0, 0, 0, 0, 0, NFQNL_CFG_CMD_BIND) < 0) {
        set_err(err, errlen, "bind queue (is another process bound to it?)");
        nfqb_close(q);
        return NULL;
    }
    if (config(q, 1, copy_range, flags & mask, mask, maxlen, NFQNL_CFG_CMD_NONE) < 0) {
        set_err(err, errlen, "configure queue");
        nfqb_close(q);
        return NULL;
    }
    for (int i = 0; i < batch; i++) {
        q->iov[i].iov_base = q->rx + (size_t)i * NFQB_RXBUF;
        q->iov[i].iov_len = NFQB_RXBUF;
        q->msgs[i].msg_hdr.msg_iov = &q->iov[i];
        q->msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return q;
}

int nfqb_fileno(const struct nfqb *q) { return q->fd; }

const struct nfqb_stats *nfqb_stats(const struct nfqb *q) { return &q->stats; }

struct nfqb_pkt *nfqb_packets(struct nfqb *q) { return q->pkts; }

int nfqb_recv(struct nfqb *q, int max)
{
    if (max > q->batch)
        max = q->batch;
    if (max < 1)
        return 0;
    int n = 0;
    for (int tries = 0; tries < 4 && n == 0; tries++) {
        int r = recvmmsg(q->fd, q->msgs, (unsigned)max, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == ENOBUFS) {   /* the kernel could not queue packets to us: counted, read on */
                q->stats.enobufs++;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return 0;
            q->stats.recv_errors++;
            return -errno;
        }
        for (int i = 0; i < r && n < max; i++) {
            uint64_t errs = 0;
            int got = nfqb_parse_datagram(q->iov[i].iov_base, q->msgs[i].msg_len, q->pkts + n, max - n, &errs);
            q->stats.parse_errors += errs;
            n += got;
        }
        if (r == 0)
            break;
    }
    q->stats.received += (uint64_t)n;
    for (int i = 0; i < n; i++)
        if (q->pkts[i].skbinfo & NFQA_SKB_GSO)
            q->stats.gso_packets++;
    return n;
}

int nfqb_decide(struct nfqb *q, int i, int verdict, unsigned char *payload, uint32_t len, int64_t set_mark)
{
    if (i < 0 || i >= q->batch)
        return -1;
    struct nfqb_pkt *p = &q->pkts[i];
    p->verdict = verdict ? NF_ACCEPT : NF_DROP;
    p->set_mark = set_mark;
    p->new_data = NULL;
    p->new_len = 0;
    if (payload && verdict) {
        if (len > NFQB_COPY_MAX + 4)
            return -1;
        p->new_data = payload;
        p->new_len = len;
    }
    return 0;
}

static int tx_flush(struct nfqb *q)
{
    if (q->txlen == 0)
        return 0;
    ssize_t r = mnl_socket_sendto(q->nl, q->tx, q->txlen);
    q->txlen = 0;
    if (r < 0) {
        q->stats.verdict_errors++;
        return -1;
    }
    return 0;
}

static struct nlmsghdr *tx_msg(struct nfqb *q, int type, size_t need)
{
    size_t room = MNL_ALIGN(sizeof(struct nlmsghdr)) + MNL_ALIGN(sizeof(struct nfgenmsg)) + need + 64;
    if (q->txlen + room > NFQB_TXBUF)
        tx_flush(q);
    return nfq_nlmsg_put((char *)q->tx + q->txlen, type, q->queue);
}

static void tx_done(struct nfqb *q, struct nlmsghdr *nlh) { q->txlen += MNL_ALIGN(nlh->nlmsg_len); }

int nfqb_commit(struct nfqb *q, int from, int to)
{
    if (from < 0)
        from = 0;
    if (to > q->batch)
        to = q->batch;
    int run_last = -1;   /* the index of the last plain accept of the current run */
    for (int i = from; i < to; i++) {
        struct nfqb_pkt *p = &q->pkts[i];
        int plain = p->verdict == NF_ACCEPT && p->new_data == NULL && p->set_mark < 0;
        if (plain) {
            run_last = i;
            continue;
        }
        if (run_last >= 0) {
            struct nlmsghdr *nlh = tx_msg(q, NFQNL_MSG_VERDICT_BATCH, 16);
            nfq_nlmsg_verdict_put(nlh, (int)q->pkts[run_last].id, NF_ACCEPT);
            tx_done(q, nlh);
            q->stats.batch_verdicts++;
            run_last = -1;
        }
        struct nlmsghdr *nlh = tx_msg(q, NFQNL_MSG_VERDICT, 16 + (p->new_data ? MNL_ALIGN(p->new_len) + 4 : 0));
        nfq_nlmsg_verdict_put(nlh, (int)p->id, p->verdict);
        if (p->set_mark >= 0)
            nfq_nlmsg_verdict_put_mark(nlh, (uint32_t)p->set_mark);
        if (p->new_data)
            nfq_nlmsg_verdict_put_pkt(nlh, p->new_data, p->new_len);
        tx_done(q, nlh);
        q->stats.verdicts++;
        p->new_data = NULL;
    }
    if (run_last >= 0) {
        struct nlmsghdr *nlh = tx_msg(q, NFQNL_MSG_VERDICT_BATCH, 16);
        nfq_nlmsg_verdict_put(nlh, (int)q->pkts[run_last].id, NF_ACCEPT);
        tx_done(q, nlh);
        q->stats.batch_verdicts++;
    }
    return tx_flush(q);
}

void nfqb_close(struct nfqb *q)
{
    if (!q)
        return;
    if (q->nl) {
        if (q->fd > 0) {
            char buf[256];
            struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, q->queue);
            nfq_nlmsg_cfg_put_cmd(nlh, AF_UNSPEC, NFQNL_CFG_CMD_UNBIND);
            mnl_socket_sendto(q->nl, nlh, nlh->nlmsg_len);
        }
        mnl_socket_close(q->nl);
    }
    free(q->rx);
    free(q->msgs);
    free(q->iov);
    free(q->pkts);
    free(q->tx);
    free(q);
}
