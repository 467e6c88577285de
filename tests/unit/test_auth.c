/* test_auth.c - proto/auth.c: the key lists (`PUBLICKEY TENANT [ROLE...]` for clients,
 * `PUBLICKEY [NAME]` for workers: roles, the default tenant "-", comments, every malformed line
 * refused with its line number, duplicates) and the ZAP handler in a real context: a listed client
 * key gets through and its messages carry its tenant and roles, an unlisted key, a worker's key on
 * the client socket, a client's key on the worker socket and a plaintext peer get nothing, and
 * --clients-open lets any key in as the default tenant without roles. Skipped (77) without CURVE. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"

typedef struct pair {
    char pub[CURVE_KEY_Z85 + 1], sec[CURVE_KEY_Z85 + 1];
} pair_t;

static pair_t key_pair(void)
{
    pair_t p;
    assert_int_equal(zmq_curve_keypair(p.pub, p.sec), 0);
    return p;
}

static auth_keys_t *parse(const char *text, bool clients, fl_error_t *err)
{
    return auth_keys_parse(text, strlen(text), "keys.txt", clients, err);
}

static void test_auth_client_keys_parse(void **state)
{
    (void)state;
    pair_t a = key_pair(), b = key_pair(), c = key_pair(), d = key_pair();
    char text[1024];
    snprintf(text, sizeof text,
             "# clients\n"
             "%s ops admin\n"
             "\n"
             "  %s  alice\r\n"
             "%s - admin gateway\n"
             "%s gw gateway   # trailing words are roles: refused below\n",
             a.pub, b.pub, c.pub, d.pub);
    fl_error_t err = {0};
    assert_null(parse(text, true, &err)); /* "#" is not a role */
    assert_non_null(strstr(err.msg, "keys.txt:6"));
    snprintf(text, sizeof text, "# clients\n%s ops admin\n\n  %s  alice\r\n%s - admin gateway\n%s gw gateway\n", a.pub,
             b.pub, c.pub, d.pub);
    auth_keys_t *k = parse(text, true, &err);
    assert_non_null(k);
    assert_int_equal(k->n, 4);
    const auth_key_t *e = auth_keys_find(k, a.pub);
    assert_non_null(e);
    assert_string_equal(e->name, "ops");
    assert_int_equal(e->roles, AUTH_ROLE_ADMIN);
    e = auth_keys_find(k, b.pub);
    assert_string_equal(e->name, "alice");
    assert_int_equal(e->roles, 0);
    e = auth_keys_find(k, c.pub);
    assert_string_equal(e->name, ""); /* "-": the default tenant */
    assert_int_equal(e->roles, AUTH_ROLE_ADMIN | AUTH_ROLE_GATEWAY);
    e = auth_keys_find(k, d.pub);
    assert_int_equal(e->roles, AUTH_ROLE_GATEWAY);
    pair_t x = key_pair();
    assert_null(auth_keys_find(k, x.pub));
    assert_null(auth_keys_find(k, "short"));
    assert_null(auth_keys_find(k, NULL));
    auth_keys_destroy(&k);
    assert_null(k);
    auth_keys_destroy(NULL);
}

static void test_auth_key_lists_refuse_bad_lines(void **state)
{
    (void)state;
    pair_t a = key_pair();
    char text[2048], long_name[400];
    memset(long_name, 'n', 257);
    long_name[257] = 0;
    struct {
        const char *fmt; /* %s: a's public key (or nothing) */
        bool clients;
        const char *expect; /* in the message */
    } cases[] = {
        {"%s\n", true, "keys.txt:1: a key without a tenant"},
        {"# c\n%s bob superuser\n", true, "keys.txt:2: role 'superuser'"},
        {"%s bob\n%s carol\n", true, "listed twice"},
        {"%.39s bob\n", true, "keys.txt:1: not a CURVE public key"},
        {"not-a-key bob\n", true, "keys.txt:1: not a CURVE public key"},
        {"# nothing\n\n", true, "no keys"},
        {"", false, "no keys"},
        {"%s w0 extra\n", false, "keys.txt:1: more than"},
        {"%s \xff\xfe\n", true, "not UTF-8"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(text, sizeof text, cases[i].fmt, a.pub, a.pub);
        fl_error_t err = {0};
        auth_keys_t *k = parse(text, cases[i].clients, &err);
        if (k) fail_msg("case %zu accepted: %s", i, text);
        if (!strstr(err.msg, cases[i].expect)) fail_msg("case %zu: '%s' lacks '%s'", i, err.msg, cases[i].expect);
    }
    snprintf(text, sizeof text, "%s %s\n", a.pub, long_name);
    fl_error_t err = {0};
    assert_null(parse(text, true, &err));
    assert_non_null(strstr(err.msg, "at most 256 bytes"));
    /* workers: the name is optional */
    snprintf(text, sizeof text, "%s\n", a.pub);
    auth_keys_t *k = parse(text, false, &err);
    assert_non_null(k);
    assert_string_equal(auth_keys_find(k, a.pub)->name, "");
    auth_keys_destroy(&k);
    assert_null(auth_keys_load("/nonexistent/keys", true, &err));
    assert_int_equal(err.code, FL_EIO);
}

static void test_auth_tenant_rules(void **state)
{
    (void)state;
    const auth_peer_t plain = {.tenant = "alice", .listed = true};
    const auth_peer_t gateway = {.tenant = "gw", .roles = AUTH_ROLE_GATEWAY, .listed = true};
    const auth_peer_t admin = {.tenant = "ops", .roles = AUTH_ROLE_ADMIN, .listed = true};
    assert_string_equal(auth_tenant(&plain, "bob"), "alice"); /* a claim is never trusted */
    assert_string_equal(auth_tenant(&plain, ""), "alice");
    assert_string_equal(auth_tenant(&admin, "bob"), "ops");
    assert_string_equal(auth_tenant(&gateway, "bob"), "bob"); /* the gateway relays its API keys' tenants */
    assert_string_equal(auth_tenant(&gateway, ""), "gw");
}

/* ---- the ZAP handler ---- */

typedef struct zap_fixture {
    void *ctx, *clients, *workers, *peers; /* peers: a worker's KV peer socket, on the same handler */
    auth_keys_t *wkeys, *ckeys;
    auth_t *auth;
    pair_t server, worker, admin, alice, stranger;
    char ep_clients[128], ep_workers[128], ep_peers[128];
} zap_fixture_t;

static void fixture_start(zap_fixture_t *f, bool open, bool with_client_list)
{
    static int seq;
    memset(f, 0, sizeof *f);
    f->server = key_pair();
    f->worker = key_pair();
    f->admin = key_pair();
    f->alice = key_pair();
    f->stranger = key_pair();
    char text[512];
    fl_error_t err = {0};
    snprintf(text, sizeof text, "%s w0\n", f->worker.pub);
    assert_non_null(f->wkeys = parse(text, false, &err));
    if (with_client_list) {
        snprintf(text, sizeof text, "%s ops admin\n%s alice\n", f->admin.pub, f->alice.pub);
        assert_non_null(f->ckeys = parse(text, true, &err));
    }
    f->ctx = zmq_ctx_new();
    f->auth = auth_new(f->ctx, f->wkeys, f->ckeys, open, &err);
    assert_non_null(f->auth);
    snprintf(f->ep_clients, sizeof f->ep_clients, "ipc:///tmp/folio_test_auth_%d_%d_c", (int)getpid(), seq);
    snprintf(f->ep_workers, sizeof f->ep_workers, "ipc:///tmp/folio_test_auth_%d_%d_w", (int)getpid(), seq);
    snprintf(f->ep_peers, sizeof f->ep_peers, "ipc:///tmp/folio_test_auth_%d_%d_p", (int)getpid(), seq++);
    f->clients = wire_socket(f->ctx, ZMQ_ROUTER, NULL, &err);
    f->workers = wire_socket(f->ctx, ZMQ_ROUTER, NULL, &err);
    f->peers = wire_socket(f->ctx, ZMQ_ROUTER, NULL, &err);
    assert_int_equal(curve_server_setup(f->clients, f->server.sec, AUTH_DOMAIN_CLIENTS, &err), 0);
    assert_int_equal(curve_server_setup(f->workers, f->server.sec, AUTH_DOMAIN_WORKERS, &err), 0);
    assert_int_equal(curve_server_setup(f->peers, f->server.sec, AUTH_DOMAIN_PEERS, &err), 0);
    assert_int_equal(zmq_bind(f->clients, f->ep_clients), 0);
    assert_int_equal(zmq_bind(f->workers, f->ep_workers), 0);
    assert_int_equal(zmq_bind(f->peers, f->ep_peers), 0);
}

static void fixture_stop(zap_fixture_t *f)
{
    zmq_close(f->clients);
    zmq_close(f->workers);
    zmq_close(f->peers);
    auth_destroy(&f->auth);
    assert_null(f->auth);
    zmq_ctx_term(f->ctx);
    auth_keys_destroy(&f->wkeys);
    auth_keys_destroy(&f->ckeys);
}

/* A DEALER to ep with key k (NULL: plaintext) sends one folio message; true when router gets it
 * within 1.5 s, then *peer is what auth_client_peer says of it and user (when not NULL) the key
 * auth_user_key reads off the message. */
static bool reaches_as(zap_fixture_t *f, void *router, const char *ep, const pair_t *k, auth_peer_t *peer, char *user)
{
    fl_error_t err = {0};
    void *d = wire_socket(f->ctx, ZMQ_DEALER, NULL, &err);
    assert_non_null(d);
    if (k) assert_int_equal(curve_client_setup(d, k->sec, f->server.pub, &err), 0);
    assert_int_equal(zmq_connect(d, ep), 0);
    assert_int_equal(wire_send(d, NULL, 0, false, WIRE_HEADER_CLIENT, WIRE_CMD_REQUEST, NULL, &err), 0);
    zmq_pollitem_t it = {router, 0, ZMQ_POLLIN, 0};
    const bool got = zmq_poll(&it, 1, 1500) == 1;
    if (got) {
        wire_msg_t m;
        assert_int_equal(wire_recv(router, true, false, &m, &err), 0);
        if (peer) auth_client_peer(f->auth, &m, peer);
        if (user) auth_user_key(&m, user);
        wire_msg_close(&m);
    }
    zmq_close(d);
    return got;
}

static bool reaches(zap_fixture_t *f, void *router, const char *ep, const pair_t *k, auth_peer_t *peer)
{
    return reaches_as(f, router, ep, k, peer, NULL);
}

/* k's connection to the client socket gets through and is seen as tenant with roles. */
static void client_seen_as(zap_fixture_t *f, const pair_t *k, const char *tenant, unsigned roles, bool listed)
{
    auth_peer_t p;
    assert_true(reaches(f, f->clients, f->ep_clients, k, &p));
    assert_string_equal(p.tenant, tenant);
    assert_int_equal(p.roles, roles);
    assert_int_equal(p.listed, listed);
}

static void test_auth_zap_listed_keys_only(void **state)
{
    (void)state;
    zap_fixture_t f;
    fixture_start(&f, false, true);
    client_seen_as(&f, &f.admin, "ops", AUTH_ROLE_ADMIN, true);
    client_seen_as(&f, &f.alice, "alice", 0, true);
    assert_false(reaches(&f, f.clients, f.ep_clients, &f.stranger, NULL));
    assert_false(reaches(&f, f.clients, f.ep_clients, NULL, NULL));      /* plaintext */
    assert_false(reaches(&f, f.clients, f.ep_clients, &f.worker, NULL)); /* a worker's key is no client's */
    assert_true(reaches(&f, f.workers, f.ep_workers, &f.worker, NULL));
    assert_false(reaches(&f, f.workers, f.ep_workers, &f.admin, NULL)); /* nor a client's a worker's */
    assert_false(reaches(&f, f.workers, f.ep_workers, &f.stranger, NULL));
    assert_false(reaches(&f, f.workers, f.ep_workers, NULL, NULL));
    client_seen_as(&f, &f.alice, "alice", 0, true); /* still served after the refusals */
    fixture_stop(&f);
}

/* A worker's KV peer socket (domain folio-peers) takes the worker list, never a client's key, even
 * with --clients-open; the message carries the key it came in with (auth_user_key), which is how the
 * coordinator learns a holder's key from its READY. */
static void test_auth_zap_peer_socket_takes_the_worker_list(void **state)
{
    (void)state;
    zap_fixture_t f;
    fixture_start(&f, true, true);
    char user[CURVE_KEY_Z85 + 1] = "x";
    assert_true(reaches_as(&f, f.peers, f.ep_peers, &f.worker, NULL, user));
    assert_string_equal(user, f.worker.pub);
    assert_false(reaches(&f, f.peers, f.ep_peers, &f.admin, NULL));
    assert_false(reaches(&f, f.peers, f.ep_peers, &f.stranger, NULL));
    assert_false(reaches(&f, f.peers, f.ep_peers, NULL, NULL));
    assert_true(reaches_as(&f, f.workers, f.ep_workers, &f.worker, NULL, user));
    assert_string_equal(user, f.worker.pub);
    fixture_stop(&f);
}

static void test_auth_zap_clients_open(void **state)
{
    (void)state;
    zap_fixture_t f;
    fixture_start(&f, true, true);
    client_seen_as(&f, &f.stranger, "", 0, false);
    client_seen_as(&f, &f.admin, "ops", AUTH_ROLE_ADMIN, true);            /* the listed keep their tenant and roles */
    assert_false(reaches(&f, f.clients, f.ep_clients, NULL, NULL));        /* open to keys, not to plaintext */
    assert_false(reaches(&f, f.workers, f.ep_workers, &f.stranger, NULL)); /* workers are never open */
    fixture_stop(&f);
    fixture_start(&f, true, false); /* open without a list */
    client_seen_as(&f, &f.alice, "", 0, false);
    fixture_stop(&f);
}

int main(void)
{
    if (!curve_available()) {
        printf("skipped: this libzmq has no CURVE\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_auth_client_keys_parse), cmocka_unit_test(test_auth_key_lists_refuse_bad_lines),
        cmocka_unit_test(test_auth_tenant_rules),      cmocka_unit_test(test_auth_zap_listed_keys_only),
        cmocka_unit_test(test_auth_zap_clients_open), cmocka_unit_test(test_auth_zap_peer_socket_takes_the_worker_list),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
