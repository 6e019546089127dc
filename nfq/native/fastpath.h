/* The compiled fast path's flow cache: see fastpath.c for the theory of operation.
 * This header is also the cffi declaration (nfq/native/build.py reads it between the marks). */
#ifndef FASTPATH_H
#define FASTPATH_H
#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
#define FPC_CLIENT 1     /* client -> service packets of the flow may take the fast path */
#define FPC_SERVER 2     /* backend -> client pure ACKs */
#define FPC_SERVER_DATA 4  /* backend -> client data segments in order: tracked and hashed here */
#define FPC_CLIENT_DATA 8  /* client -> service data segments in order: tracked and logged here */
#define FPC_CHUNK 65536    /* checkpoint.streamlog.CHUNK */

/* what one end has put on the wire: the fields of checkpoint.ici.HalfConnection a pure
 * acknowledgment can change, with has_* for the ones Python keeps as None until first seen */
struct fpc_half {
    uint32_t next_seq;
    uint32_t ack;
    uint32_t tsval;
    uint32_t ts_recent;
    uint32_t window_raw;
    uint32_t data_high;     /* highest end of payload seen (install requires it known) */
    uint8_t has_ack;
    uint8_t has_tsval;
    uint8_t has_ts_recent;
    uint8_t shift;          /* the window's scale for segments other than SYNs (0: unscaled) */
    uint8_t ts_advanced;    /* tsval rose since the last sync: the owner stamps its clock sample */
    uint64_t window;
    uint64_t max_window;
    uint64_t segments;
    uint64_t out_of_window;
    uint64_t retransmissions;
};

/* the server stream's digest while its data is hashed here: the fields of
 * checkpoint.streamlog.StreamDigest and its Masker that a segment in order changes */
struct fpc_digest {
    void *state;            /* the running XXH3-128 state, shared with Python (checkpoint.xxh3) */
    uint32_t base_seq;      /* the sequence number of stream offset 0: the server's ISN + 1 */
    uint32_t end;           /* stream bytes hashed */
    uint32_t grid;          /* chunks end at grid + k * FPC_CHUNK */
    uint32_t limit;         /* the stream's end (2**31): a segment past it goes to Python */
    uint32_t left;          /* bytes still to mask at the start of the next data */
    uint8_t tail[16];       /* the last bytes of the stream, where a pattern may have begun */
    uint8_t ntail;
    uint8_t plen;           /* the volatile field's pattern (0: nothing masked) */
    uint8_t pattern[16];
    uint32_t vlen;          /* the length of its value */
    uint64_t bytes;         /* payload bytes taken here since the last sync */
};

/* the client's byte log while its data is logged here: checkpoint.streamlog.ByteLog's fields a
 * segment in order changes; the bytes themselves wait in the cache's arena for the sync */
struct fpc_log {
    uint32_t base_seq;      /* the sequence number of stream offset 0: the client's ISN + 1 */
    uint32_t end;           /* the stream offset after the bytes logged */
    uint32_t room;          /* bytes the log may still take before its limit */
    uint64_t bytes;         /* payload bytes taken here since the last sync */
};

/* client bytes staged for the owner to append to a log (fpc_staged), in order */
struct fpc_staged {
    int32_t slot;
    uint32_t offset;        /* their stream offset */
    uint32_t at;            /* where they are in the arena */
    uint32_t len;
};

/* a chunk finished here, for the owner to append to the digest (fpc_chunks) */
struct fpc_chunk {
    int32_t slot;
    uint32_t bound;
    uint8_t digest[16];
};

struct fpc_flow {
    int64_t conn_id;                 /* -1: a free slot */
    uint32_t epoch;                  /* the cache's epoch at its install (fpc_clear raises it) */
    uint8_t family;                  /* 4 or 6 */
    uint8_t dirs;                    /* FPC_CLIENT | FPC_SERVER */
    uint8_t client_addr[16];         /* 4 bytes used for IPv4 */
    uint8_t vip[16];
    uint8_t backend_addr[16];
    uint16_t client_port;
    uint16_t vport;
    uint16_t backend_port;
    struct fpc_half client;
    struct fpc_half server;
    struct fpc_digest dg;            /* used with FPC_SERVER_DATA */
    struct fpc_log lg;               /* used with FPC_CLIENT_DATA */
    uint32_t client_packets;         /* taken by the fast path since the last sync */
    uint32_t server_packets;
    /* the cache's own */
    uint32_t touched_gen;
    uint32_t punt_gen;
    int32_t next_c;
    int32_t next_s;
};

struct fpc_stats {
    uint64_t fast;          /* packets decided here */
    uint64_t punted;        /* packets left to the Python engine */
    uint64_t no_flow;       /* of those: no offloaded flow */
    uint64_t not_pure_ack;  /* of those: SYN, FIN, RST, URG, no ACK, or a payload */
    uint64_t unusual;       /* of those: IP options, extension headers, fragments, a truncated copy */
    uint64_t stale;         /* of those: the flow's entry was from an older epoch, or its other packet punted */
    uint64_t data_fast;     /* data segments hashed here (counted in fast too) */
    uint64_t not_in_order;  /* punted data: out of order, overlapping, past the limit, too many fields */
    uint64_t logged;        /* client data segments logged here (counted in fast too) */
    uint64_t installs;
    uint64_t removes;
    uint64_t full;          /* installs refused: the cache was full */
};

struct fpc;
struct nfqb;

struct fpc *fpc_new(uint32_t capacity);
void fpc_free(struct fpc *c);
const struct fpc_stats *fpc_stats(const struct fpc *c);
uint32_t fpc_count(const struct fpc *c);
void fpc_clear(struct fpc *c);
int fpc_install(struct fpc *c, const struct fpc_flow *flow);
int fpc_remove(struct fpc *c, int slot, int64_t conn_id);
struct fpc_flow *fpc_flow(struct fpc *c, int slot);
int fpc_set_digest(struct fpc *c, int slot, void *state, uint32_t end, uint32_t grid, uint32_t left,
                   const uint8_t *tail, uint32_t ntail);
int fpc_chunks(const struct fpc *c, const struct fpc_chunk **chunks);
int fpc_set_log(struct fpc *c, int slot, int enabled, uint32_t end, uint32_t room);
int fpc_staged(const struct fpc *c, const struct fpc_staged **staged, const uint8_t **arena);
void fpc_begin(struct fpc *c);
int fpc_packet(struct fpc *c, const unsigned char *pkt, uint32_t len);
int fpc_touched(const struct fpc *c, const int32_t **slots);
void fpc_synced(struct fpc *c);
int fpc_batch(struct fpc *c, struct nfqb *q, int n, int64_t clear_mark, int32_t *punted, int32_t *fast,
              int *nfast);
/* cffi-end */
#endif
