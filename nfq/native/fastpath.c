/* The compiled fast path: the plain packets of ordinary connections, decided without Python.
 *
 * Theory of operation
 * -------------------
 * The Python engine (appliance.dataplane) stays the owner of every connection record and the
 * specification of what a packet does.  For a connection in the plainest state it can be in —
 * ESTABLISHED, no FIN or RST seen, in its ordinary mode (not being moved, held, resumed or
 * resynced), its client packets rewritten by the kernel's stateless rule, no HTTP framing to
 * feed and, for the return direction, no delayed-ACK gate — the Python engine does little with a
 * segment without SYN, FIN, RST or URG: it folds it into the sender's half of the record (the
 * tracker, checkpoint/tracker.py), appends a client segment's new bytes to the client's log,
 * masks and hashes a server segment's new bytes into the stream digest, and accepts the packet
 * unchanged.  The owner *offloads* such a connection: it installs a flow here (fpc_install)
 * holding a copy of the fields those segments change — both halves of the tracker, the log's
 * end and room (FPC_CLIENT_DATA), the digest's end, chunk grid and masker state, with a pointer
 * to the digest's own XXH3 state (FPC_SERVER_DATA; checkpoint/native/xxh3.c).
 *
 * For each packet of a batch (fpc_packet; fpc_batch for a queue's batch) the cache parses the
 * headers, finds the flow by the packet's addresses and ports (client -> VIP, or backend ->
 * client) and, when the packet is one it can take, folds it exactly as the Python engine would
 * and gives the verdict: accept.  A pure ACK is always one it can take; a data segment when its
 * stream is in order: a client's new bytes are copied into the arena (fpc_staged), a server's are
 * masked (the one volatile field, with checkpoint/native/memfind.c) and hashed, each chunk that
 * completes leaving its digest in a ring (fpc_chunks).  A wholly retransmitted segment only
 * counts.  Every other packet is *punted*: left to Python, and so is every later packet of the
 * same flow in the same batch (fpc_begin starts a batch), so the packets of one connection are
 * folded in the order they came.  After the cache has seen the batch and before Python handles
 * the punted packets (and before any verdict leaves), the owner copies the touched flows' fields,
 * the staged bytes and the finished chunks into its records (fpc_touched, fpc_synced): the
 * records are exact at every point where Python looks at them, and no client byte reaches a
 * backend unlogged.  When Python has handled a packet of an offloaded flow it pushes the state
 * that packet changed (its half of the flow, fpc_set_log, fpc_set_digest) or removes the flow (its state
 * changed); any change of mode or service removes the flow or clears the cache.
 *
 * The fold is the tracker's for a segment without SYN, FIN or RST: segments counted; a sequence
 * number 2**30 or more from the end's next_seq is counted in out_of_window and nothing else
 * changes; data_high, next_seq, the acknowledgment, TSval and TSecr move only forward by less than
 * 2**30 (a segment that does not move data_high is a retransmission); the window is taken from a
 * segment carrying the newest acknowledgment, shifted by the end's scale.  The state cannot
 * change (no FIN is known either way), so it is not derived.  tests/unit/test_fastpath.py runs
 * the two side by side.
 *
 * Nothing here allocates after fpc_new; nothing trusts a length it did not check; a packet the
 * parser does not like is punted, never refused (Python counts malformed packets).
 */
#include <stdlib.h>
#include <string.h>

#include <linux/netfilter.h>

#include "fastpath.h"
#include "memfind.h"
#include "nfqbind.h"
#include "xxh3.h"

#define MAX_JUMP (1u << 30)
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10
#define TH_URG 0x20
#define MAX_MASKS 64          /* volatile values in one segment, at most (more: Python) */
#define CHUNK_RING 4096       /* chunks finished between two syncs, at most */
#define STAGED_MAX 4096       /* client segments logged between two syncs, at most */
#define ARENA (16u << 20)     /* their bytes */

struct fpc {
    struct fpc_flow *flows;
    uint32_t capacity;
    uint32_t count;
    int32_t *free_slots;     /* a stack of free slot numbers */
    uint32_t nfree;
    int32_t *cbuckets;       /* heads of the client-key chains (linked by next_c), -1: empty */
    int32_t *sbuckets;       /* heads of the server-key chains (linked by next_s) */
    uint32_t nbuckets;       /* of each; a power of two */
    int32_t *touched;        /* slots folded into since the last sync */
    uint32_t ntouched;
    struct fpc_chunk *chunks; /* chunks finished since the last sync, in order */
    uint32_t nchunks;
    struct fpc_staged *staged; /* client bytes logged since the last sync, in order */
    uint32_t nstaged;
    uint8_t *arena;           /* ... their bytes */
    uint32_t arena_used;
    uint32_t epoch;
    uint32_t gen;            /* the current batch */
    struct fpc_stats stats;
};

static inline int32_t sdiff(uint32_t a, uint32_t b) { return (int32_t)(a - b); }

static inline int advances(uint32_t old, uint32_t new_)
{
    uint32_t d = new_ - old;
    return d > 0 && d < MAX_JUMP;
}

static inline uint32_t rd32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint16_t rd16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t key_hash(uint8_t family, const uint8_t *a, uint16_t ap, const uint8_t *b, uint16_t bp)
{
    size_t n = family == 6 ? 16 : 4;
    uint32_t h = 2166136261u ^ family;
    for (size_t i = 0; i < n; i++)
        h = (h ^ a[i]) * 16777619u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 16777619u;
    h = (h ^ ap) * 16777619u;
    h = (h ^ bp) * 16777619u;
    return h ^ (h >> 15);
}

struct fpc *fpc_new(uint32_t capacity)
{
    if (capacity < 1 || capacity > (1u << 24))
        return NULL;
    struct fpc *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->capacity = capacity;
    c->nbuckets = 1;
    while (c->nbuckets < 2 * capacity)
        c->nbuckets <<= 1;
    c->flows = calloc(capacity, sizeof(*c->flows));
    c->free_slots = calloc(capacity, sizeof(*c->free_slots));
    c->cbuckets = malloc(sizeof(*c->cbuckets) * c->nbuckets);
    c->sbuckets = malloc(sizeof(*c->sbuckets) * c->nbuckets);
    c->touched = calloc(capacity, sizeof(*c->touched));
    c->chunks = calloc(CHUNK_RING, sizeof(*c->chunks));
    c->staged = calloc(STAGED_MAX, sizeof(*c->staged));
    c->arena = malloc(ARENA);
    if (!c->flows || !c->free_slots || !c->cbuckets || !c->sbuckets || !c->touched || !c->chunks || !c->staged ||
        !c->arena) {
        fpc_free(c);
        return NULL;
    }
    fpc_clear(c);   /* every slot free, every chain empty; epoch 1 */
    c->gen = 1;
    return c;
}

void fpc_free(struct fpc *c)
{
    if (!c)
        return;
    free(c->flows);
    free(c->free_slots);
    free(c->cbuckets);
    free(c->sbuckets);
    free(c->touched);
    free(c->chunks);
    free(c->staged);
    free(c->arena);
    free(c);
}

const struct fpc_stats *fpc_stats(const struct fpc *c) { return &c->stats; }
uint32_t fpc_count(const struct fpc *c) { return c->count; }

static inline uint32_t client_bucket(const struct fpc *c, const struct fpc_flow *f)
{
    return key_hash(f->family, f->client_addr, f->client_port, f->vip, f->vport) & (c->nbuckets - 1);
}

static inline uint32_t server_bucket(const struct fpc *c, const struct fpc_flow *f)
{
    return key_hash(f->family, f->backend_addr, f->backend_port, f->client_addr, f->client_port) &
           (c->nbuckets - 1);
}

static void unlink_slot(struct fpc *c, int32_t slot)
{
    struct fpc_flow *f = &c->flows[slot];
    int32_t *pp = &c->cbuckets[client_bucket(c, f)];
    while (*pp >= 0 && *pp != slot)
        pp = &c->flows[*pp].next_c;
    if (*pp == slot)
        *pp = f->next_c;
    pp = &c->sbuckets[server_bucket(c, f)];
    while (*pp >= 0 && *pp != slot)
        pp = &c->flows[*pp].next_s;
    if (*pp == slot)
        *pp = f->next_s;
    f->conn_id = -1;
    c->free_slots[c->nfree++] = slot;
    c->count--;
    c->stats.removes++;
}

int fpc_remove(struct fpc *c, int slot, int64_t conn_id)
{
    if (slot < 0 || (uint32_t)slot >= c->capacity || conn_id < 0 || c->flows[slot].conn_id != conn_id)
        return -1;
    unlink_slot(c, slot);
    return 0;
}

void fpc_clear(struct fpc *c)
{
    for (uint32_t i = 0; i < c->nbuckets; i++)
        c->cbuckets[i] = c->sbuckets[i] = -1;
    for (uint32_t i = 0; i < c->capacity; i++) {
        c->flows[i].conn_id = -1;
        c->free_slots[i] = (int32_t)(c->capacity - 1 - i);
    }
    c->stats.removes += c->count;
    c->nfree = c->capacity;
    c->count = 0;
    c->ntouched = 0;
    c->nchunks = 0;
    c->nstaged = 0;
    c->arena_used = 0;
    c->epoch++;
}

static int32_t lookup_client(const struct fpc *c, uint8_t fam, const uint8_t *src, uint16_t sport,
                             const uint8_t *dst, uint16_t dport);
static int32_t lookup_server(const struct fpc *c, uint8_t fam, const uint8_t *src, uint16_t sport,
                             const uint8_t *dst, uint16_t dport);

/* A direction's data is taken here only with the direction itself, and the server's only with
 * a digest state and a masker the cache can carry on. */
static void settle_dirs(struct fpc_flow *f)
{
    const struct fpc_digest *d = &f->dg;
    if (!(f->dirs & FPC_CLIENT))
        f->dirs &= (uint8_t)~FPC_CLIENT_DATA;
    if (!(f->dirs & FPC_SERVER) || !d->state || d->plen > sizeof(d->pattern) || d->ntail > sizeof(d->tail) ||
        (d->plen ? d->ntail >= d->plen : d->ntail != 0))
        f->dirs &= (uint8_t)~FPC_SERVER_DATA;
}

int fpc_install(struct fpc *c, const struct fpc_flow *flow)
{
    if (flow->conn_id < 0 || (flow->family != 4 && flow->family != 6))
        return -1;
    /* one entry per key: an older entry for either goes (the owner removes its own first) */
    int32_t dup = lookup_client(c, flow->family, flow->client_addr, flow->client_port, flow->vip, flow->vport);
    if (dup >= 0)
        unlink_slot(c, dup);
    dup = lookup_server(c, flow->family, flow->backend_addr, flow->backend_port, flow->client_addr,
                        flow->client_port);
    if (dup >= 0)
        unlink_slot(c, dup);
    if (c->nfree == 0) {
        c->stats.full++;
        return -1;
    }
    int32_t slot = c->free_slots[--c->nfree];
    struct fpc_flow *f = &c->flows[slot];
    *f = *flow;
    f->epoch = c->epoch;
    f->client_packets = f->server_packets = 0;
    f->client.ts_advanced = f->server.ts_advanced = 0;
    f->dg.bytes = 0;
    f->lg.bytes = 0;
    settle_dirs(f);
    f->touched_gen = 0;
    f->punt_gen = 0;
    uint32_t b = client_bucket(c, f);
    f->next_c = c->cbuckets[b];
    c->cbuckets[b] = slot;
    b = server_bucket(c, f);
    f->next_s = c->sbuckets[b];
    c->sbuckets[b] = slot;
    c->count++;
    c->stats.installs++;
    return slot;
}

struct fpc_flow *fpc_flow(struct fpc *c, int slot)
{
    if (slot < 0 || (uint32_t)slot >= c->capacity || c->flows[slot].conn_id < 0)
        return NULL;
    return &c->flows[slot];
}

int fpc_set_digest(struct fpc *c, int slot, void *state, uint32_t end, uint32_t grid, uint32_t left,
                   const uint8_t *tail, uint32_t ntail)
{
    struct fpc_flow *f = fpc_flow(c, slot);
    if (!f)
        return -1;
    struct fpc_digest *d = &f->dg;
    d->state = ntail <= sizeof(d->tail) ? state : NULL;
    if (d->state) {
        d->end = end;
        d->grid = grid;
        d->left = left;
        memcpy(d->tail, tail, ntail);
        d->ntail = (uint8_t)ntail;
    }
    f->dirs |= FPC_SERVER_DATA;
    settle_dirs(f);
    return state && !(f->dirs & FPC_SERVER_DATA) ? -1 : 0;
}

int fpc_set_log(struct fpc *c, int slot, int enabled, uint32_t end, uint32_t room)
{
    struct fpc_flow *f = fpc_flow(c, slot);
    if (!f)
        return -1;
    f->lg.end = end;
    f->lg.room = room;
    f->dirs = enabled ? f->dirs | FPC_CLIENT_DATA : f->dirs & (uint8_t)~FPC_CLIENT_DATA;
    settle_dirs(f);
    return enabled && !(f->dirs & FPC_CLIENT_DATA) ? -1 : 0;
}

int fpc_staged(const struct fpc *c, const struct fpc_staged **staged, const uint8_t **arena)
{
    *staged = c->staged;
    *arena = c->arena;
    return (int)c->nstaged;
}

int fpc_chunks(const struct fpc *c, const struct fpc_chunk **chunks)
{
    *chunks = c->chunks;
    return (int)c->nchunks;
}

static int32_t lookup_client(const struct fpc *c, uint8_t fam, const uint8_t *src, uint16_t sport,
                             const uint8_t *dst, uint16_t dport)
{
    size_t n = fam == 6 ? 16 : 4;
    int32_t s = c->cbuckets[key_hash(fam, src, sport, dst, dport) & (c->nbuckets - 1)];
    while (s >= 0) {
        const struct fpc_flow *f = &c->flows[s];
        if (f->family == fam && f->client_port == sport && f->vport == dport &&
            !memcmp(f->client_addr, src, n) && !memcmp(f->vip, dst, n))
            return s;
        s = f->next_c;
    }
    return -1;
}

static int32_t lookup_server(const struct fpc *c, uint8_t fam, const uint8_t *src, uint16_t sport,
                             const uint8_t *dst, uint16_t dport)
{
    size_t n = fam == 6 ? 16 : 4;
    int32_t s = c->sbuckets[key_hash(fam, src, sport, dst, dport) & (c->nbuckets - 1)];
    while (s >= 0) {
        const struct fpc_flow *f = &c->flows[s];
        if (f->family == fam && f->backend_port == sport && f->client_port == dport &&
            !memcmp(f->backend_addr, src, n) && !memcmp(f->client_addr, dst, n))
            return s;
        s = f->next_s;
    }
    return -1;
}

void fpc_begin(struct fpc *c) { c->gen++; }

/* The data of TCP option `kind` with total length `length`, or -1: nfq.packet.find_option. */
static long find_option(const unsigned char *buf, size_t start, size_t end, unsigned kind, unsigned length)
{
    size_t o = start;
    while (o < end) {
        unsigned k = buf[o];
        if (k == 0)
            return -1;
        if (k == 1) {
            o++;
            continue;
        }
        if (o + 1 >= end)
            return -1;
        unsigned ln = buf[o + 1];
        if (ln < 2 || o + ln > end)
            return -1;
        if (k == kind && ln == length)
            return (long)(o + 2);
        o += ln;
    }
    return -1;
}

/* checkpoint.tracker.observe for a segment without SYN, FIN or RST, ACK set, plen bytes of payload */
static void fold(struct fpc_half *me, uint32_t seq, uint32_t plen, uint32_t ack, uint16_t window, int has_ts,
                 uint32_t tsval, uint32_t tsecr)
{
    me->segments++;
    if (sdiff(seq, me->next_seq) >= (int32_t)MAX_JUMP || sdiff(seq, me->next_seq) <= -(int32_t)MAX_JUMP) {
        me->out_of_window++;
        return;
    }
    uint32_t end = seq + plen;
    if (plen) {
        if (advances(me->data_high, end))
            me->data_high = end;
        else
            me->retransmissions++;
    }
    if (advances(me->next_seq, end))
        me->next_seq = end;
    if (!me->has_ack || advances(me->ack, ack)) {
        me->ack = ack;
        me->has_ack = 1;
    }
    if (me->ack == ack) {   /* the newest acknowledgment: its window is current */
        me->window_raw = window;
        me->window = (uint64_t)window << me->shift;
        if (me->window > me->max_window)
            me->max_window = me->window;
    }
    if (has_ts) {
        if (!me->has_tsval || advances(me->tsval, tsval)) {
            me->tsval = tsval;
            me->has_tsval = 1;
            me->ts_advanced = 1;
        }
        if (tsecr && (!me->has_ts_recent || advances(me->ts_recent, tsecr))) {
            me->ts_recent = tsecr;
            me->has_ts_recent = 1;
        }
    }
}

/* --- the stream digest (checkpoint.streamlog.StreamDigest._hash and Masker) ---------------- */

struct masks {
    uint32_t n;
    uint32_t start[MAX_MASKS + 1];
    uint32_t stop[MAX_MASKS + 1];
    uint32_t left;              /* Masker.left after this data */
};

/* Where Masker.__call__ would put '*' in data (p, n), reading d's masker state; -1: more values
 * than MAX_MASKS (Python masks that segment).  Nothing is changed. */
static int plan_masks(const struct fpc_digest *d, const uint8_t *p, uint32_t n, struct masks *m)
{
    m->n = 0;
    m->left = d->left;
    if (!d->plen)
        return 0;
    uint32_t plen = d->plen, keep = plen - 1;
    if (m->left) {
        uint32_t k = m->left < n ? m->left : n;
        m->start[m->n] = 0;
        m->stop[m->n++] = k;
        m->left -= k;
    }
    uint32_t ends[MAX_MASKS + 1], ne = 0;
    uint32_t t = d->ntail;
    if (t) {   /* a pattern that begins in the tail and ends in this data */
        uint8_t edge[32];
        uint32_t ek = keep < n ? keep : n;
        memcpy(edge, d->tail, t);
        memcpy(edge + t, p, ek);
        for (uint32_t i = 0; i < t; i++)
            if (i + plen <= t + ek && !memcmp(edge + i, d->pattern, plen) && i + plen > t) {
                if (ne == MAX_MASKS)
                    return -1;
                ends[ne++] = i + plen - t;
            }
    }
    size_t from = 0;
    while (from + plen <= n) {
        int64_t i = mf_find(p + from, n - from, d->pattern, plen);
        if (i < 0)
            break;
        if (ne == MAX_MASKS)
            return -1;
        ends[ne++] = (uint32_t)(from + (size_t)i + plen);
        from += (size_t)i + 1;
    }
    for (uint32_t j = 0; j < ne; j++) {
        uint32_t start = ends[j], stop = start + d->vlen;
        uint32_t k = (stop < n ? stop : n) > start ? (stop < n ? stop : n) - start : 0;
        m->start[m->n] = start;
        m->stop[m->n++] = start + k;
        if (stop > n && stop - n > m->left)
            m->left = stop - n;
    }
    return 0;
}

static void hash_bytes(struct fpc *c, int32_t slot, struct fpc_digest *d, const uint8_t *src, uint32_t len)
{
    while (len) {
        uint32_t nb = d->grid + ((d->end - d->grid) / FPC_CHUNK + 1) * FPC_CHUNK;
        uint32_t part = len < nb - d->end ? len : nb - d->end;
        xh_update(d->state, src, part);
        d->end += part;
        src += part;
        len -= part;
        if (d->end == nb) {   /* a chunk is whole: its digest for the owner, the state afresh */
            struct fpc_chunk *ch = &c->chunks[c->nchunks++];
            xh_digest(d->state, ch->digest);
            ch->slot = slot;
            ch->bound = nb;
            xh_reset(d->state);
        }
    }
}

static void hash_masked(struct fpc *c, int32_t slot, struct fpc_digest *d, const uint8_t *p, uint32_t n,
                        const struct masks *m)
{
    static const uint8_t stars[64] = {
        '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*',
        '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*',
        '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*',
        '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*', '*'};
    uint32_t pos = 0;
    for (uint32_t j = 0; j < m->n; j++) {   /* starts ascend; a mask may overlap the one before */
        uint32_t s = m->start[j], e = m->stop[j];
        if (s > pos) {
            hash_bytes(c, slot, d, p + pos, s - pos);
            pos = s;
        }
        while (e > pos) {
            uint32_t k = e - pos < sizeof(stars) ? e - pos : (uint32_t)sizeof(stars);
            hash_bytes(c, slot, d, stars, k);
            pos += k;
        }
    }
    if (n > pos)
        hash_bytes(c, slot, d, p + pos, n - pos);
    /* the masker's tail: the stream's last keep bytes, unmasked */
    if (d->plen) {
        uint32_t keep = d->plen - 1u;
        if (n >= keep) {
            memcpy(d->tail, p + n - keep, keep);
            d->ntail = (uint8_t)keep;
        } else {
            uint8_t joined[32];
            uint32_t t = d->ntail;
            memcpy(joined, d->tail, t);
            memcpy(joined + t, p, n);
            uint32_t total = t + n, k = total < keep ? total : keep;
            memcpy(d->tail, joined + total - k, k);
            d->ntail = (uint8_t)k;
        }
    }
    d->left = m->left;
}

int fpc_packet(struct fpc *c, const unsigned char *pkt, uint32_t len)
{
    uint8_t fam;
    size_t l4, total;
    const unsigned char *src, *dst;
    if (len < 40)
        goto unusual;
    if (pkt[0] >> 4 == 4) {
        if (pkt[0] != 0x45 || pkt[9] != 6 || (rd16(pkt + 6) & 0x3fff))
            goto unusual;
        fam = 4;
        l4 = 20;
        total = rd16(pkt + 2);
        src = pkt + 12;
        dst = pkt + 16;
    } else if (pkt[0] >> 4 == 6) {
        if (pkt[6] != 6 || len < 60)
            goto unusual;
        fam = 6;
        l4 = 40;
        total = 40 + (size_t)rd16(pkt + 4);
        src = pkt + 8;
        dst = pkt + 24;
    } else {
        goto unusual;
    }
    if (total != len)
        goto unusual;
    size_t thl = (size_t)(pkt[l4 + 12] >> 4) * 4;
    if (thl < 20 || l4 + thl > total)
        goto unusual;
    unsigned flags = pkt[l4 + 13];
    uint16_t sport = rd16(pkt + l4), dport = rd16(pkt + l4 + 2);
    int dir = FPC_CLIENT;
    int32_t slot = lookup_client(c, fam, src, sport, dst, dport);
    if (slot < 0) {
        dir = FPC_SERVER;
        slot = lookup_server(c, fam, src, sport, dst, dport);
    }
    if (slot < 0) {
        c->stats.punted++;
        c->stats.no_flow++;
        return -1;
    }
    struct fpc_flow *f = &c->flows[slot];
    if (f->epoch != c->epoch || !(f->dirs & dir) || f->punt_gen == c->gen) {
        c->stats.stale++;
        goto punt;
    }
    if (!(flags & TH_ACK) || (flags & (TH_SYN | TH_FIN | TH_RST | TH_URG))) {
        c->stats.not_pure_ack++;
        goto punt;
    }
    uint32_t plen = (uint32_t)(total - l4 - thl);
    uint32_t seq = rd32(pkt + l4 + 4);
    struct masks m;
    int hash = 0;
    const uint8_t *payload = pkt + l4 + thl;
    uint32_t stage_from = 0, stage_len = 0;
    if (plen && dir == FPC_CLIENT) {   /* the client's data in order, logged (staged) here */
        if (!(f->dirs & FPC_CLIENT_DATA)) {
            c->stats.not_pure_ack++;
            goto punt;
        }
        struct fpc_log *lg = &f->lg;
        int64_t off = (int32_t)(seq - lg->base_seq);
        if (off < 0) {   /* before the stream: the engine does not log it */
            c->stats.not_in_order++;
            goto punt;
        }
        if (off + plen > lg->end) {   /* new bytes (else a retransmission: nothing to log) */
            uint32_t skip = (uint32_t)(lg->end - off);
            stage_len = plen - (off <= lg->end ? skip : 0);
            if (off > lg->end || stage_len > lg->room || c->nstaged == STAGED_MAX ||
                stage_len > ARENA - c->arena_used) {
                c->stats.not_in_order++;
                goto punt;
            }
            stage_from = skip;
        }
        f->lg.bytes += plen;
        c->stats.logged++;
    } else if (plen) {   /* a data segment: the server's, in order, hashed here; anything else is Python's */
        if (!(f->dirs & FPC_SERVER_DATA)) {
            c->stats.not_pure_ack++;
            goto punt;
        }
        struct fpc_digest *d = &f->dg;
        int64_t off = (int32_t)(seq - d->base_seq);   /* checkpoint.seqnum.seq_diff */
        if (off + plen > d->end) {                     /* new bytes (else a retransmission: no digest) */
            if (off != d->end || (uint64_t)off + plen > d->limit ||
                c->nchunks + plen / FPC_CHUNK + 2 > CHUNK_RING || plan_masks(d, payload, plen, &m) < 0) {
                c->stats.not_in_order++;
                goto punt;
            }
            hash = 1;
        }
        f->dg.bytes += plen;
        c->stats.data_fast++;
    }
    long ts = find_option(pkt, l4 + 20, l4 + thl, 8, 10);
    fold(dir == FPC_CLIENT ? &f->client : &f->server, seq, plen, rd32(pkt + l4 + 8), rd16(pkt + l4 + 14), ts >= 0,
         ts >= 0 ? rd32(pkt + ts) : 0, ts >= 0 ? rd32(pkt + ts + 4) : 0);
    if (hash)
        hash_masked(c, slot, &f->dg, payload, plen, &m);
    if (stage_len) {
        struct fpc_staged *st = &c->staged[c->nstaged++];
        st->slot = slot;
        st->offset = f->lg.end;
        st->at = c->arena_used;
        st->len = stage_len;
        memcpy(c->arena + c->arena_used, payload + stage_from, stage_len);
        c->arena_used += stage_len;
        f->lg.end += stage_len;
        f->lg.room -= stage_len;
    }
    if (dir == FPC_CLIENT)
        f->client_packets++;
    else
        f->server_packets++;
    if (f->touched_gen == 0) {   /* first fold since the last sync */
        f->touched_gen = c->gen;
        c->touched[c->ntouched++] = slot;
    }
    c->stats.fast++;
    return slot;

punt:
    f->punt_gen = c->gen;   /* the rest of this flow's batch goes to Python too, in order */
    c->stats.punted++;
    return -1;
unusual:
    c->stats.punted++;
    c->stats.unusual++;
    return -1;
}

int fpc_touched(const struct fpc *c, const int32_t **slots)
{
    *slots = c->touched;
    return (int)c->ntouched;
}

void fpc_synced(struct fpc *c)
{
    for (uint32_t i = 0; i < c->ntouched; i++) {
        struct fpc_flow *f = &c->flows[c->touched[i]];
        f->touched_gen = 0;
        f->client_packets = f->server_packets = 0;
        f->client.ts_advanced = f->server.ts_advanced = 0;
        f->dg.bytes = 0;
        f->lg.bytes = 0;
    }
    c->ntouched = 0;
    c->nchunks = 0;
    c->nstaged = 0;
    c->arena_used = 0;
}

int fpc_batch(struct fpc *c, struct nfqb *q, int n, int64_t clear_mark, int32_t *punted, int32_t *fast, int *nfast)
{
    struct nfqb_pkt *pkts = nfqb_packets(q);
    int np = 0, nf = 0;
    fpc_begin(c);
    for (int i = 0; i < n; i++) {
        struct nfqb_pkt *p = &pkts[i];
        if (p->len != p->orig_len || fpc_packet(c, p->data, p->len) < 0) {
            if (p->len != p->orig_len) {
                c->stats.punted++;
                c->stats.unusual++;
            }
            punted[np++] = i;
            continue;
        }
        int64_t mark = clear_mark >= 0 && p->mark == (uint32_t)clear_mark ? 0 : -1;
        nfqb_decide(q, i, 1, NULL, 0, mark);
        fast[nf++] = i;
    }
    *nfast = nf;
    return np;
}
