/* auth.c - key lists and the ZAP handler; see auth.h.
 *
 * The handler is a REP socket bound to inproc://zeromq.zap.01 in the coordinator's context, served
 * by one thread that polls it (waking every AUTH_POLL_MS to notice auth_destroy). Each request is
 * [version "1.0"][request id][domain][address][routing id][mechanism][credentials...]; the reply is
 * [version][request id][status code][status text][user id][metadata]. Refusals are logged once per
 * key and side within AUTH_LOG_EVERY_S, so a worker retrying with a bad key does not flood the log.
 * The thread owns its socket and the refusal memory; the key lists are read-only. */
#include "auth.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "file_read.h"
#include "log.h"
#include "unicode.h"

#define AUTH_ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define AUTH_POLL_MS      100
#define AUTH_LOG_MEMORY   32
#define AUTH_LOG_EVERY_S  60.0
#define AUTH_ZAP_FRAMES   8 /* a CURVE request has 7 */

struct auth {
    void *zap;
    const auth_keys_t *workers, *clients;
    bool clients_open;
    pthread_t thread;
    bool running;
    atomic_bool quit;
    struct {
        char key[CURVE_KEY_Z85 + 1];
        bool workers;
        double at;
    } logged[AUTH_LOG_MEMORY]; /* refusals lately logged (the thread's) */
    int logged_next;
};

/* ---- key lists ---- */

void auth_keys_destroy(auth_keys_t **kp)
{
    if (!kp || !*kp) return;
    free((*kp)->keys);
    free(*kp);
    *kp = NULL;
}

static int cmp_key(const void *a, const void *b)
{
    return memcmp(((const auth_key_t *)a)->key, ((const auth_key_t *)b)->key, CURVE_KEY_Z85);
}

const auth_key_t *auth_keys_find(const auth_keys_t *k, const char *key)
{
    if (!k || !key || strlen(key) != CURVE_KEY_Z85) return NULL;
    auth_key_t probe;
    memcpy(probe.key, key, CURVE_KEY_Z85 + 1);
    return bsearch(&probe, k->keys, (size_t)k->n, sizeof *k->keys, cmp_key);
}

static bool utf8_ok(const char *s, size_t n)
{
    for (const uint8_t *p = (const uint8_t *)s; n;) {
        const int k = unicode_utf8_valid_prefix(p, n);
        if (k <= 0) return false;
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* The next field of the line [*p, end) separated by blanks, or NULL; its length in *n. */
static const char *field(const char **p, const char *end, size_t *n)
{
    while (*p < end && (**p == ' ' || **p == '\t' || **p == '\r')) (*p)++;
    if (*p == end) return NULL;
    const char *s = *p;
    while (*p < end && **p != ' ' && **p != '\t' && **p != '\r') (*p)++;
    *n = (size_t)(*p - s);
    return s;
}

/* Fills e from one line's fields after the key; FL_OK or an error naming what was wrong. */
static int parse_rest(auth_key_t *e, const char *p, const char *end, bool clients, const char *where, fl_error_t *err)
{
    size_t n = 0;
    const char *s = field(&p, end, &n);
    if (clients && !s)
        return fl_fail(err, FL_EFORMAT, "%s: a key without a tenant (`PUBLICKEY TENANT [ROLE...]`)", where);
    if (s) {
        if (n > AUTH_NAME_MAX || !utf8_ok(s, n))
            return fl_fail(err, FL_EFORMAT, "%s: the %s is not UTF-8 of at most %d bytes", where,
                           clients ? "tenant" : "name", AUTH_NAME_MAX);
        if (!clients || n != 1 || *s != '-') memcpy(e->name, s, n); /* "-": the default tenant "" */
    }
    while ((s = field(&p, end, &n))) {
        if (!clients) return fl_fail(err, FL_EFORMAT, "%s: more than `PUBLICKEY [NAME]`", where);
        if (n == 5 && !memcmp(s, "admin", 5))
            e->roles |= AUTH_ROLE_ADMIN;
        else if (n == 7 && !memcmp(s, "gateway", 7))
            e->roles |= AUTH_ROLE_GATEWAY;
        else
            return fl_fail(err, FL_EFORMAT, "%s: role '%.*s': expected admin or gateway", where, n > 64 ? 64 : (int)n,
                           s);
    }
    return FL_OK;
}

auth_keys_t *auth_keys_parse(const char *text, size_t len, const char *name, bool clients, fl_error_t *err)
{
    auth_keys_t *k = calloc(1, sizeof *k);
    int cap = 0, line_no = 0;
    if (!k) goto oom;
    for (const char *p = text, *end = text + len; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *eol = nl ? nl : end;
        const char *line = p;
        p = nl ? nl + 1 : end;
        line_no++;
        size_t n = 0;
        const char *key = field(&line, eol, &n);
        if (!key || *key == '#') continue;
        char where[300];
        snprintf(where, sizeof where, "%.200s:%d", name, line_no);
        if (!curve_key_valid(key, n)) {
            fl_fail(err, FL_EFORMAT, "%s: not a CURVE public key (%d Z85 characters, as folioctl keygen writes)", where,
                    CURVE_KEY_Z85);
            goto fail;
        }
        if (k->n == cap) {
            cap = cap ? 2 * cap : 16;
            auth_key_t *grown = realloc(k->keys, (size_t)cap * sizeof *grown);
            if (!grown) goto oom;
            k->keys = grown;
        }
        auth_key_t *e = &k->keys[k->n];
        memset(e, 0, sizeof *e);
        memcpy(e->key, key, n);
        if (parse_rest(e, line, eol, clients, where, err)) goto fail;
        k->n++;
    }
    if (!k->n) {
        fl_fail(err, FL_EFORMAT, "%s: no keys (lines `%s`)", name,
                clients ? "PUBLICKEY TENANT [ROLE...]" : "PUBLICKEY [NAME]");
        goto fail;
    }
    qsort(k->keys, (size_t)k->n, sizeof *k->keys, cmp_key);
    for (int i = 1; i < k->n; i++)
        if (!cmp_key(&k->keys[i - 1], &k->keys[i])) {
            fl_fail(err, FL_EFORMAT, "%s: key %s is listed twice", name, k->keys[i].key);
            goto fail;
        }
    return k;
oom:
    fl_fail(err, FL_ENOMEM, "%s: out of memory", name);
fail:
    auth_keys_destroy(&k);
    return NULL;
}

auth_keys_t *auth_keys_load(const char *path, bool clients, fl_error_t *err)
{
    size_t len = 0;
    char *text = fl_read_file(path, &len);
    if (!text) {
        fl_fail(err, FL_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    auth_keys_t *k = auth_keys_parse(text, len, path, clients, err);
    free(text);
    return k;
}

/* ---- the ZAP handler ---- */

/* True when this refusal was not logged within AUTH_LOG_EVERY_S; remembers it. */
static bool should_log(auth_t *a, const char *key, bool workers)
{
    const double now = fl_clock_s();
    for (int i = 0; i < AUTH_LOG_MEMORY; i++)
        if (a->logged[i].workers == workers && now - a->logged[i].at < AUTH_LOG_EVERY_S &&
            !strcmp(a->logged[i].key, key))
            return false;
    snprintf(a->logged[a->logged_next].key, sizeof a->logged[0].key, "%s", key);
    a->logged[a->logged_next].workers = workers;
    a->logged[a->logged_next].at = now;
    a->logged_next = (a->logged_next + 1) % AUTH_LOG_MEMORY;
    return true;
}

static bool frame_is(zmq_msg_t *f, const char *s)
{
    return zmq_msg_size(f) == strlen(s) && !memcmp(zmq_msg_data(f), s, strlen(s));
}

/* The verdict on one request: "200" with the user id, or a refusal's code and text. */
static const char *decide(auth_t *a, zmq_msg_t *f, int n, char *user, const char **text)
{
    if (n < 7 || !frame_is(&f[0], "1.0")) return *text = "malformed ZAP request", "500";
    if (!frame_is(&f[5], "CURVE") || n != 7 || zmq_msg_size(&f[6]) != CURVE_KEY_BYTES)
        return *text = "CURVE only", "400";
    const bool peers = frame_is(&f[2], AUTH_DOMAIN_PEERS), workers = peers || frame_is(&f[2], AUTH_DOMAIN_WORKERS);
    if (!workers && !frame_is(&f[2], AUTH_DOMAIN_CLIENTS)) return *text = "unknown ZAP domain", "400";
    zmq_z85_encode(user, zmq_msg_data(&f[6]), CURVE_KEY_BYTES);
    const auth_key_t *k = auth_keys_find(workers ? a->workers : a->clients, user);
    if (k || (!workers && a->clients_open)) {
        fl_log_debug("auth accepted side=%s key=%s name=%s address=%.*s", workers ? "worker" : "client", user,
                     k ? k->name : "(open)", (int)zmq_msg_size(&f[3]), (const char *)zmq_msg_data(&f[3]));
        return *text = "OK", "200";
    }
    const char *side = peers ? "kv-peer" : workers ? "worker" : "client";
    const char *list = peers ? "--peer-keys" : workers ? "--worker-keys" : "--client-keys";
    if (should_log(a, user, workers))
        fl_log_warn("auth refused side=%s key=%s address=%.*s: the key is not in %s", side, user,
                    (int)zmq_msg_size(&f[3]), (const char *)zmq_msg_data(&f[3]), list);
    *user = 0;
    return *text = workers ? "unknown worker key" : "unknown client key", "400";
}

static void handle(auth_t *a)
{
    zmq_msg_t f[AUTH_ZAP_FRAMES];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t extra, *into = n < AUTH_ZAP_FRAMES ? &f[n] : &extra;
        zmq_msg_init(into);
        if (zmq_msg_recv(into, a->zap, 0) < 0) {
            zmq_msg_close(into);
            break;
        }
        more = zmq_msg_more(into);
        if (into == &extra) {
            zmq_msg_close(&extra);
            n = AUTH_ZAP_FRAMES + 1; /* too many: malformed */
        } else {
            n++;
        }
    }
    if (!n) return; /* nothing received: nothing to answer (the context is ending) */
    const int have = n < AUTH_ZAP_FRAMES ? n : AUTH_ZAP_FRAMES;
    char user[CURVE_KEY_Z85 + 1] = "";
    const char *text, *code = decide(a, f, n, user, &text);
    /* the reply echoes the request id (empty when it did not come) */
    zmq_send(a->zap, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(a->zap, have > 1 ? zmq_msg_data(&f[1]) : "", have > 1 ? zmq_msg_size(&f[1]) : 0, ZMQ_SNDMORE);
    zmq_send(a->zap, code, 3, ZMQ_SNDMORE);
    zmq_send(a->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(a->zap, user, strlen(user), ZMQ_SNDMORE);
    zmq_send(a->zap, "", 0, 0);
    for (int i = 0; i < have; i++) zmq_msg_close(&f[i]);
}

static void *zap_thread(void *arg)
{
    auth_t *a = arg;
    zmq_pollitem_t item = {a->zap, 0, ZMQ_POLLIN, 0};
    while (!atomic_load(&a->quit)) {
        const int rc = zmq_poll(&item, 1, AUTH_POLL_MS);
        if (rc < 0 && errno == ETERM) break;
        if (rc > 0) handle(a);
    }
    return NULL;
}

auth_t *auth_new(void *zctx, const auth_keys_t *workers, const auth_keys_t *clients, bool clients_open, fl_error_t *err)
{
    auth_t *a = calloc(1, sizeof *a);
    if (!a) {
        fl_fail(err, FL_ENOMEM, "auth: out of memory");
        return NULL;
    }
    a->workers = workers;
    a->clients = clients;
    a->clients_open = clients_open;
    const int zero = 0;
    if (!(a->zap = zmq_socket(zctx, ZMQ_REP)) || zmq_setsockopt(a->zap, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_bind(a->zap, AUTH_ZAP_ENDPOINT)) {
        fl_fail(err, FL_EIO, "ZAP handler %s: %s", AUTH_ZAP_ENDPOINT, zmq_strerror(errno));
        auth_destroy(&a);
        return NULL;
    }
    const int rc = pthread_create(&a->thread, NULL, zap_thread, a);
    if (rc) {
        fl_fail(err, FL_EIO, "ZAP handler thread: %s", strerror(rc));
        auth_destroy(&a);
        return NULL;
    }
    a->running = true;
    return a;
}

void auth_destroy(auth_t **ap)
{
    if (!ap || !*ap) return;
    auth_t *a = *ap;
    if (a->running) {
        atomic_store(&a->quit, true);
        pthread_join(a->thread, NULL);
    }
    if (a->zap) zmq_close(a->zap);
    free(a);
    *ap = NULL;
}

/* ---- the event loop's side ---- */

bool auth_user_key(const wire_msg_t *m, char *key)
{
    *key = 0;
    if (m->n_frames < 1) return false;
    /* libzmq attaches the connection's metadata to the frames it received (not to the identity
     * frame a ROUTER makes up), so the last frame carries it. */
    const char *user = zmq_msg_gets((zmq_msg_t *)&m->frames[m->n_frames - 1], "User-Id");
    if (!user || strlen(user) != CURVE_KEY_Z85) return false;
    memcpy(key, user, CURVE_KEY_Z85 + 1);
    return true;
}

void auth_client_peer(const auth_t *a, const wire_msg_t *m, auth_peer_t *out)
{
    *out = (auth_peer_t){.tenant = ""};
    char user[CURVE_KEY_Z85 + 1];
    if (!a || !auth_user_key(m, user)) return;
    const auth_key_t *k = auth_keys_find(a->clients, user);
    if (!k) return;
    out->tenant = k->name;
    out->roles = k->roles;
    out->listed = true;
}

const char *auth_tenant(const auth_peer_t *p, const char *claimed)
{
    if ((p->roles & AUTH_ROLE_GATEWAY) && claimed && *claimed) return claimed;
    return p->tenant;
}
