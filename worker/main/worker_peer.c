/* worker_peer.c - KV block pulls between groups (proto/README.md, "KV block pulls").
 *
 * Holder: a ROUTER socket (--kv-peer) answers KvPull with the KV of the requested prompt blocks
 * that its prefix cache holds under the puller's tenant, copied out on the loop's thread between
 * steps (so nothing can evict them while they are read: the copy is the pin), in messages of at
 * most PEER_CHUNK_BYTES.
 *
 * Puller: a Generate whose coordinator named a holder (kv_pull_endpoint) and whose leading blocks
 * are not all in the local cache is parked instead of submitted; a DEALER to the holder asks for
 * the missing blocks. Each block that comes is checked (its size, the message's checksum), written
 * into a free block and published under the hash this worker computes from its own prompt tokens
 * and tenant. Then the request is submitted and the scheduler's prefix lookup finds the blocks like
 * any others. Anything wrong (a refusal, a gap, a bad checksum, no room, the timeout) ends the pull
 * early: the request is submitted with what arrived, and the rest of its prompt is computed.
 *
 * With CURVE (--curve-secret, --peer-keys) the holder's ROUTER is a CURVE server of the worker's own
 * key, admitting the keys of --peer-keys (auth.h, AUTH_DOMAIN_PEERS), and a puller's DEALER is a
 * CURVE client that expects the key the coordinator saw the holder register with (kv_pull_key):
 * blocks never travel in the clear, and neither side can be posed as.
 *
 * A tensor-parallel group's rank 0 serves and pulls for its group: blocks travel whole (every KV
 * head, as a one-rank group holds them), gathered from and handed out to the ranks by tp_kv_read and
 * tp_kv_write, so groups of any cuts exchange blocks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define XXH_INLINE_ALL /* header-only, as in block_hash.c */
#include <xxhash.h>

#include "clock.h"
#include "log.h"
#include "tp.h"
#include "worker.h"

#define PEER_CHUNK_BYTES (4u << 20) /* a KvBlocks body stays well under WIRE_MAX_BODY_BYTES */
#define PEER_MAX_LINKS   8          /* holders a worker keeps a DEALER to */
#define PEER_QUIET_S     30.0       /* a holder that answered nothing before a timeout is not asked again for this long */
#define PEER_LINK_IDLE_S 5.0        /* a link unused this long is closed (its holder may be gone: a
                                       restarted worker listens on another port) */

struct peer_pull {
    uint64_t pull_id;
    double deadline;
    int link;
    worker_req_t *r;
    Folio__V1__Request *msg; /* the Generate, which rq borrows from; freed when the pull ends */
    request_t rq;          /* resolved; submitted when the pull ends */
    block_hash_t *hashes;  /* [n_blocks] of the prompt's leading blocks */
    int n_blocks;          /* blocks asked for end here */
    int next_block;        /* the next block expected */
    int first_block;       /* where the pull began (blocks before were local) */
    double t_start;
    bool follower;         /* another pull (same pull_id) is fetching these blocks: it waits for that one */
};

struct peer_link {
    char endpoint[WIRE_MAX_IDENTITY + 1];
    char key[CURVE_KEY_Z85 + 1]; /* the holder's CURVE public key ("" plaintext) */
    void *sock;
    double last_used;
    double quiet_until; /* a pull to it timed out with nothing back: an endpoint this worker cannot
                           reach (a loopback address from another host) would cost every hinted
                           request the timeout */
};

/* A block as pulls carry it: whole, every KV head of the model. */
static size_t block_bytes(const worker_t *w) { return tp_kv_block_bytes(w->eng->model, w->eng->kv); }

int worker_peer_init(worker_t *w, const char *bind, const char *advertise, fl_error_t *err)
{
    snprintf(w->kv_layout, sizeof w->kv_layout, "%s|%s|%u", w->model_id, w->kv_type, w->block_size);
    w->pulls = calloc((size_t)w->n_reqs, sizeof *w->pulls);
    w->links = calloc(PEER_MAX_LINKS, sizeof *w->links);
    if (!w->pulls || !w->links) return fl_fail(err, FL_ENOMEM, "worker: out of memory for KV pulls");
    w->pull_on = true;
    if (!bind) return FL_OK;
    if (!(w->peer_sock = wire_socket(w->zctx, ZMQ_ROUTER, NULL, err))) return err->code;
    if (w->curve && curve_server_setup(w->peer_sock, w->curve_secret, AUTH_DOMAIN_PEERS, err)) return err->code;
    if (zmq_bind(w->peer_sock, bind))
        return fl_fail(err, FL_EIO, "worker: --kv-peer %s: %s", bind, zmq_strerror(errno));
    if (advertise) {
        snprintf(w->peer_endpoint, sizeof w->peer_endpoint, "%s", advertise);
    } else {
        size_t n = sizeof w->peer_endpoint;
        if (zmq_getsockopt(w->peer_sock, ZMQ_LAST_ENDPOINT, w->peer_endpoint, &n))
            return fl_fail(err, FL_EIO, "worker: --kv-peer %s: %s", bind, zmq_strerror(errno));
    }
    fl_log_info("worker serving KV block pulls at %s (layout %s, %zu bytes a block, encrypted=%s, tp=%d)",
                w->peer_endpoint, w->kv_layout, block_bytes(w), w->curve ? "yes" : "no", w->tp);
    return FL_OK;
}

static void pull_free(struct peer_pull *p)
{
    free(p->hashes);
    p->hashes = NULL;
}

void worker_peer_close(worker_t *w)
{
    for (int i = 0; w->pulls && i < w->n_pulls; i++) {
        request_release(&w->pulls[i].rq);
        folio__v1__request__free_unpacked(w->pulls[i].msg, NULL);
        pull_free(&w->pulls[i]);
    }
    w->n_pulls = 0;
    for (int i = 0; w->links && i < w->n_links; i++) zmq_close(w->links[i].sock);
    w->n_links = 0;
    if (w->peer_sock) zmq_close(w->peer_sock);
    w->peer_sock = NULL;
    free(w->pulls);
    free(w->links);
    w->pulls = NULL;
    w->links = NULL;
}

/* --- holder ----------------------------------------------------------------------------------- */

static void serve_reply(worker_t *w, const wire_msg_t *m, uint64_t pull_id, uint32_t first, uint32_t n,
                        const uint8_t *data, size_t len, bool last, const char *error)
{
    Folio__V1__KvBlocks b = FOLIO__V1__KV_BLOCKS__INIT;
    b.pull_id = pull_id;
    b.first_block = first;
    b.n_blocks = n;
    b.data.data = (uint8_t *)data;
    b.data.len = len;
    b.checksum = XXH3_64bits(data, len);
    b.last = last;
    b.error = (char *)(error ? error : "");
    fl_error_t err = {0};
    if (wire_send(w->peer_sock, m->identity, m->identity_len, false, WIRE_HEADER_PEER, WIRE_CMD_KV_BLOCKS, &b.base,
                  &err))
        fl_log_warn("worker KV pull %llu: the answer did not go: %s", (unsigned long long)pull_id, err.msg);
}

/* True when m is a peer message of command cmd; else says why it is ignored (from: whose). */
static bool peer_command(const wire_msg_t *m, int cmd, const char *from)
{
    fl_error_t err = {0};
    if (!wire_check_header(m, WIRE_HEADER_PEER, &err) && m->cmd == cmd) return true;
    fl_log_warn("worker ignored a message %s: %s", from,
                err.code ? err.msg : cmd == WIRE_CMD_KV_PULL ? "not KV_PULL" : "not KV_BLOCKS");
    return false;
}

static void serve_pull(worker_t *w, const wire_msg_t *m)
{
    fl_error_t err = {0};
    if (!peer_command(m, WIRE_CMD_KV_PULL, "on the KV peer socket")) return;
    Folio__V1__KvPull *q = wire_decode_kv_pull(m->body, m->body_len, &err);
    if (!q) {
        fl_log_warn("worker ignored a KV pull: %s", err.msg);
        return;
    }
    kv_cache_t *kv = w->eng->kv;
    const int bs = kv->block_size;
    const int n = (int)(q->n_tokens / (size_t)bs);
    if (strcmp(q->layout, w->kv_layout)) {
        char why[1200];
        snprintf(why, sizeof why, "the holder's KV layout is %s, the puller's %.300s", w->kv_layout, q->layout);
        serve_reply(w, m, q->pull_id, q->first_block, 0, NULL, 0, true, why);
        folio__v1__kv_pull__free_unpacked(q, NULL);
        return;
    }
    block_hash_t *h = malloc(sizeof *h * (size_t)(n > 0 ? n : 1));
    int32_t *ids = malloc(sizeof *ids * (size_t)(n > 0 ? n : 1));
    const size_t bb = block_bytes(w);
    const int per_msg = bb >= PEER_CHUNK_BYTES ? 1 : (int)(PEER_CHUNK_BYTES / bb);
    uint8_t *buf = malloc(bb * (size_t)per_msg);
    if (!h || !ids || !buf) {
        serve_reply(w, m, q->pull_id, q->first_block, 0, NULL, 0, true, "the holder is out of memory");
        goto out;
    }
    const double t0 = fl_clock_s();
    const block_hash_t salt = block_hash_salt(q->tenant, strlen(q->tenant));
    block_hash_prefix(salt, q->tokens, n * bs, bs, h, n);
    /* The run of blocks it holds from first_block on, found before any is copied. */
    int found = 0;
    for (int i = q->first_block < (uint32_t)n ? (int)q->first_block : n; i < n; i++) {
        const int32_t b = kv_cache_find(kv, h[i], q->tokens + (size_t)i * bs);
        if (b < 0) break;
        ids[found++] = b;
    }
    if (!found) { /* none held, or first_block past the tokens sent */
        serve_reply(w, m, q->pull_id, q->first_block, 0, NULL, 0, true, "");
        goto out;
    }
    for (int done = 0; done < found;) {
        const int k = found - done < per_msg ? found - done : per_msg;
        fl_error_t rerr = {0};
        if (tp_kv_read(w->eng->model, kv, ids + done, k, buf, &rerr)) {
            fl_log_warn("worker KV pull %llu: %s", (unsigned long long)q->pull_id, rerr.msg);
            serve_reply(w, m, q->pull_id, q->first_block + (uint32_t)done, 0, NULL, 0, true,
                        "the holder could not read its blocks");
            break;
        }
        serve_reply(w, m, q->pull_id, q->first_block + (uint32_t)done, (uint32_t)k, buf, bb * (size_t)k,
                    done + k == found, NULL);
        done += k;
    }
    w->kv_served_blocks += (uint64_t)found;
    fl_log_debug("worker served KV pull %llu: %d blocks from block %u in %.1f ms", (unsigned long long)q->pull_id,
                 found, q->first_block, (fl_clock_s() - t0) * 1e3);
out:
    free(h);
    free(ids);
    free(buf);
    folio__v1__kv_pull__free_unpacked(q, NULL);
}

/* --- puller ----------------------------------------------------------------------------------- */

/* Whether a pull waits on link i. */
static bool link_busy(const worker_t *w, int i)
{
    for (int k = 0; k < w->n_pulls; k++)
        if (w->pulls[k].link == i) return true;
    return false;
}

/* Closes link i; the last link takes its place (the pulls on it follow). */
static void link_remove(worker_t *w, int i)
{
    if (w->links[i].sock) zmq_close(w->links[i].sock);
    const int last = --w->n_links;
    if (i == last) return;
    w->links[i] = w->links[last];
    for (int k = 0; k < w->n_pulls; k++)
        if (w->pulls[k].link == last) w->pulls[k].link = i;
}

/* The link to the holder at endpoint with CURVE key key ("" plaintext), made if there is none. */
static int link_for(worker_t *w, const char *endpoint, const char *key, double now)
{
    for (int i = 0; i < w->n_links; i++)
        if (!strcmp(w->links[i].endpoint, endpoint) && !strcmp(w->links[i].key, key)) {
            w->links[i].last_used = now;
            return i;
        }
    int i = w->n_links;
    if (i == PEER_MAX_LINKS) { /* the link used least recently goes, unless a pull waits on it */
        i = -1;
        for (int j = 0; j < w->n_links; j++)
            if (!link_busy(w, j) && (i < 0 || w->links[j].last_used < w->links[i].last_used)) i = j;
        if (i < 0) return -1;
        zmq_close(w->links[i].sock);
    } else {
        w->n_links++;
    }
    fl_error_t err = {0};
    struct peer_link *l = &w->links[i];
    l->sock = wire_socket(w->zctx, ZMQ_DEALER, NULL, &err);
    int rc = l->sock ? FL_OK : err.code;
    if (!rc && *key) rc = curve_client_setup(l->sock, w->curve_secret, key, &err);
    if (!rc && zmq_connect(l->sock, endpoint)) rc = fl_fail(&err, FL_EIO, "%s", zmq_strerror(errno));
    if (rc) {
        fl_log_warn("worker KV pull: cannot connect to %s: %s", endpoint, err.msg);
        link_remove(w, i);
        return -1;
    }
    snprintf(l->endpoint, sizeof l->endpoint, "%s", endpoint);
    snprintf(l->key, sizeof l->key, "%s", key);
    l->last_used = now;
    l->quiet_until = 0;
    return i;
}

bool worker_pull_start(worker_t *w, Folio__V1__Request *q, worker_req_t *r, request_t *rq, double now)
{
    const Folio__V1__GenerateRequest *g = q->generate;
    if (!w->pull_on || !*g->kv_pull_endpoint || !g->kv_pull_blocks || !w->prefix_cache ||
        !strcmp(g->kv_pull_endpoint, w->peer_endpoint) || w->n_pulls == w->n_reqs)
        return false;
    /* Encrypted links: only to a holder whose key the coordinator vouches for; plaintext: none is used. */
    const char *key = w->curve ? g->kv_pull_key : "";
    if (w->curve && !curve_key_valid(key, strlen(key))) return false;
    kv_cache_t *kv = w->eng->kv;
    const int bs = kv->block_size;
    /* The scheduler computes at least the prompt's last token, so blocks past it are never used. */
    int n = (rq->sched.n_prompt - 1) / bs;
    if (n > (int)g->kv_pull_blocks) n = (int)g->kv_pull_blocks;
    if (n <= 0) return false;
    block_hash_t *h = malloc(sizeof *h * (size_t)n);
    if (!h) return false;
    block_hash_prefix(rq->sched.salt, rq->sched.prompt, n * bs, bs, h, n);
    int first = 0;
    while (first < n && kv_cache_find(kv, h[first], rq->sched.prompt + (size_t)first * bs) >= 0) first++;
    if (first == n) {
        free(h);
        return false;
    }
    /* A pull already fetching these blocks (requests with one system prompt arrive together): wait
     * for it instead of asking the holder for the same bytes again. Equal chain hashes at block n-1
     * mean equal prompts and tenants up to there. */
    for (int j = 0; j < w->n_pulls; j++) {
        const struct peer_pull *lead = &w->pulls[j];
        if (lead->follower || lead->n_blocks < n || !block_hash_equal(lead->hashes[n - 1], h[n - 1])) continue;
        w->pulls[w->n_pulls++] = (struct peer_pull){.pull_id = lead->pull_id, .deadline = lead->deadline,
                                                    .link = lead->link, .r = r, .msg = q, .rq = *rq, .hashes = h,
                                                    .n_blocks = n, .t_start = now, .follower = true};
        fl_log_debug("worker id=%llu: waiting for pull %llu's blocks", (unsigned long long)q->id,
                     (unsigned long long)lead->pull_id);
        return true;
    }
    const int link = link_for(w, g->kv_pull_endpoint, key, now);
    if (link < 0 || now < w->links[link].quiet_until) {
        free(h);
        return false;
    }
    Folio__V1__KvPull p = FOLIO__V1__KV_PULL__INIT;
    p.pull_id = ++w->next_pull_id;
    p.layout = w->kv_layout;
    p.tenant = q->tenant;
    p.tokens = (int32_t *)rq->sched.prompt;
    p.n_tokens = (size_t)n * bs;
    p.first_block = (uint32_t)first;
    fl_error_t err = {0};
    if (wire_send(w->links[link].sock, NULL, 0, false, WIRE_HEADER_PEER, WIRE_CMD_KV_PULL, &p.base, &err)) {
        fl_log_warn("worker KV pull to %s: %s", g->kv_pull_endpoint, err.msg);
        free(h);
        return false;
    }
    struct peer_pull *pp = &w->pulls[w->n_pulls++];
    *pp = (struct peer_pull){.pull_id = p.pull_id, .deadline = now + w->pull_timeout_s, .link = link, .r = r,
                             .msg = q, .rq = *rq, .hashes = h, .n_blocks = n, .next_block = first, .first_block = first,
                             .t_start = now};
    fl_log_debug("worker id=%llu: pulling blocks %d..%d from %s (pull %llu)", (unsigned long long)q->id, first, n - 1,
                 g->kv_pull_endpoint, (unsigned long long)p.pull_id);
    return true;
}

/* Takes entry i out and submits its request with what arrived. */
static void submit_one(worker_t *w, int i)
{
    struct peer_pull done = w->pulls[i];
    w->pulls[i] = w->pulls[--w->n_pulls];
    pull_free(&done);
    worker_submit_resolved(w, done.r, &done.rq);
    folio__v1__request__free_unpacked(done.msg, NULL);
}

/* Ends pull i: its request, and those of its followers when it leads, go to the scheduler with what
 * arrived. */
static void pull_end(worker_t *w, int i, const char *why)
{
    const double now = fl_clock_s(); /* after the blocks are written: the pull's whole time */
    struct peer_pull *p = &w->pulls[i];
    if (p->follower) { /* alone: its request was cancelled; the pull it waits for goes on */
        submit_one(w, i);
        return;
    }
    const uint64_t id = p->pull_id;
    const int got = p->next_block - p->first_block;
    if (why) {
        w->kv_pull_failures++;
        if (!got && !strcmp(why, "timed out")) {
            w->links[p->link].quiet_until = now + PEER_QUIET_S;
            fl_log_warn("worker: no KV pulls from %s for %.0f s (is its --kv-peer-advertise reachable from here?)",
                        w->links[p->link].endpoint, PEER_QUIET_S);
        }
        fl_log_warn("worker KV pull %llu for id=%llu from %s ended after %d of %d blocks (%.1f ms): %s",
                    (unsigned long long)p->pull_id, (unsigned long long)p->r->id, w->links[p->link].endpoint, got,
                    p->n_blocks - p->first_block, (now - p->t_start) * 1e3, why);
    } else {
        fl_log_debug("worker KV pull %llu for id=%llu: %d blocks in %.1f ms", (unsigned long long)p->pull_id,
                     (unsigned long long)p->r->id, got, (now - p->t_start) * 1e3);
    }
    w->kv_pull_seconds += now - p->t_start;
    submit_one(w, i);
    /* Downwards: an entry swapped into j comes from above, already looked at. */
    for (int j = w->n_pulls - 1; j >= 0; j--)
        if (j < w->n_pulls && w->pulls[j].pull_id == id) submit_one(w, j);
}

/* The pull fetching pull_id's blocks (not a follower), or -1. */
static int pull_find(const worker_t *w, uint64_t pull_id)
{
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].pull_id == pull_id && !w->pulls[i].follower) return i;
    return -1;
}

/* Writes the blocks of one KvBlocks into the cache; NULL, or why the pull must end. */
static const char *install(worker_t *w, struct peer_pull *p, const Folio__V1__KvBlocks *b)
{
    kv_cache_t *kv = w->eng->kv;
    const size_t bb = block_bytes(w);
    if (*b->error) return b->error;
    if (b->first_block != (uint32_t)p->next_block) return "blocks out of order";
    if (b->n_blocks > (uint32_t)(p->n_blocks - p->next_block) || b->data.len != bb * b->n_blocks)
        return "a message of the wrong size";
    if (XXH3_64bits(b->data.data, b->data.len) != b->checksum) return "a checksum mismatch";
    const int bs = kv->block_size;
    for (uint32_t j = 0; j < b->n_blocks; j++, p->next_block++) {
        const int32_t *tokens = p->rq.sched.prompt + (size_t)p->next_block * bs;
        const block_hash_t h = p->hashes[p->next_block];
        if (kv_cache_find(kv, h, tokens) >= 0) continue; /* computed here meanwhile */
        const int32_t blk = kv_cache_alloc_block(kv);
        if (blk < 0) return "no free block";
        fl_error_t werr = {0};
        if (tp_kv_write(w->eng->model, kv, &blk, 1, b->data.data + (size_t)j * bb, &werr)) {
            fl_log_warn("worker KV pull %llu: %s", (unsigned long long)p->pull_id, werr.msg);
            kv_cache_release_block(kv, blk);
            return "the blocks could not be written";
        }
        kv_cache_publish(kv, blk, h, tokens);
        kv_cache_release_block(kv, blk); /* cached and unreferenced: the scheduler's lookup takes it */
        w->kv_pulled_blocks++;
    }
    return NULL;
}

/* A KvBlocks that came on link `link`: only the pull asked on that link takes it (another holder,
 * or anyone this worker has a link to, cannot answer a pull it was not asked). */
static void take_blocks(worker_t *w, const wire_msg_t *m, int link)
{
    fl_error_t err = {0};
    if (!peer_command(m, WIRE_CMD_KV_BLOCKS, "from a KV holder")) return;
    Folio__V1__KvBlocks *b = wire_decode_kv_blocks(m->body, m->body_len, &err);
    if (!b) {
        fl_log_warn("worker ignored a KV answer: %s", err.msg);
        return;
    }
    const int i = pull_find(w, b->pull_id);
    if (i >= 0 && w->pulls[i].link != link) {
        fl_log_warn("worker ignored KV blocks for pull %llu from %s: the pull was asked of %s",
                    (unsigned long long)b->pull_id, w->links[link].endpoint, w->links[w->pulls[i].link].endpoint);
    } else if (i >= 0) { /* else it ended already (a timeout): late blocks are dropped */
        const char *why = install(w, &w->pulls[i], b);
        if (why || b->last || w->pulls[i].next_block == w->pulls[i].n_blocks)
            pull_end(w, i, why ? why : !b->n_blocks && b->first_block == (uint32_t)w->pulls[i].first_block
                                        ? "the holder has none of the blocks"
                                        : NULL);
    }
    folio__v1__kv_blocks__free_unpacked(b, NULL);
}

/* Messages waiting on the peer ROUTER (link -1) or on link `link`'s DEALER. */
static void drain_socket(worker_t *w, int link)
{
    const bool router = link < 0;
    void *sock = router ? w->peer_sock : w->links[link].sock;
    for (int k = 0; k < 64; k++) {
        wire_msg_t m;
        fl_error_t err = {0};
        const int rc = wire_recv(sock, router, true, &m, &err);
        if (rc == FL_EIO && errno == EAGAIN) return;
        if (rc == FL_OK) {
            if (router) serve_pull(w, &m);
            else take_blocks(w, &m, link);
        } else {
            fl_log_warn("worker KV peer receive: %s", err.msg);
        }
        wire_msg_close(&m);
        if (rc == FL_EIO) return;
    }
}

void worker_peer_service(worker_t *w, double now)
{
    if (w->peer_sock) drain_socket(w, -1);
    for (int i = 0; i < w->n_links; i++) drain_socket(w, i);
    for (int i = w->n_pulls - 1; i >= 0; i--) /* followers end with their pull */
        if (i < w->n_pulls && !w->pulls[i].follower && now >= w->pulls[i].deadline) pull_end(w, i, "timed out");
    for (int i = w->n_links - 1; i >= 0; i--) /* idle links go, but while a pull waits or it is quiet */
        if (now >= w->links[i].quiet_until && now - w->links[i].last_used >= PEER_LINK_IDLE_S && !link_busy(w, i))
            link_remove(w, i);
}

int worker_peer_poll_items(worker_t *w, zmq_pollitem_t *items, int cap)
{
    int n = 0;
    if (w->peer_sock && n < cap) items[n++] = (zmq_pollitem_t){.socket = w->peer_sock, .events = ZMQ_POLLIN};
    for (int i = 0; i < w->n_links && n < cap; i++)
        items[n++] = (zmq_pollitem_t){.socket = w->links[i].sock, .events = ZMQ_POLLIN};
    return n;
}

double worker_peer_next_deadline(const worker_t *w, double wake)
{
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].deadline < wake) wake = w->pulls[i].deadline;
    return wake;
}

bool worker_pull_release(worker_t *w, uint64_t id)
{
    for (int i = 0; i < w->n_pulls; i++)
        if (w->pulls[i].r->id == id) {
            pull_end(w, i, NULL);
            return true;
        }
    return false;
}

void worker_pull_release_all(worker_t *w)
{
    while (w->n_pulls) pull_end(w, w->n_pulls - 1, NULL);
}
