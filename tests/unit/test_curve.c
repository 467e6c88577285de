/* test_curve.c - proto/curve.c: key files as folioctl keygen writes them and as every process reads
 * them (comments, blank lines, names after the key, bad keys named with their line), keygen's files and modes and its
 * refusal to overwrite, and the two sides of a CURVE link: a client with the server's key gets through, one with
 * another key does not. Skipped (77) when libzmq has no CURVE. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

#include "curve.h"

static char g_dir[256];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_curve_key_valid(void **state)
{
    (void)state;
    char pub[CURVE_KEY_Z85 + 1], sec[CURVE_KEY_Z85 + 1];
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    assert_true(curve_key_valid(pub, strlen(pub)));
    assert_true(curve_key_valid(sec, strlen(sec)));
    assert_false(curve_key_valid(pub, CURVE_KEY_Z85 - 1));
    assert_false(curve_key_valid(NULL, 0));
    char bad[CURVE_KEY_Z85 + 2];
    memcpy(bad, pub, sizeof pub);
    bad[7] = '~'; /* not a Z85 character */
    assert_false(curve_key_valid(bad, CURVE_KEY_Z85));
    memcpy(bad, pub, sizeof pub);
    strcat(bad, "x");
    assert_false(curve_key_valid(bad, strlen(bad)));
    char pub2[CURVE_KEY_Z85 + 1];
    assert_int_equal(curve_public_of(sec, pub2, NULL), 0);
    assert_string_equal(pub, pub2);
    assert_int_not_equal(curve_public_of("short", pub2, NULL), 0);
}

static void test_curve_key_file_forms(void **state)
{
    (void)state;
    char pub[CURVE_KEY_Z85 + 1], sec[CURVE_KEY_Z85 + 1], key[CURVE_KEY_Z85 + 1], text[512];
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    fl_error_t err = {0};
    /* comments, blank lines, CRLF and a name after the key */
    snprintf(text, sizeof text, "# a comment\n\n   \r\n  # indented comment\r\n  %s  worker-7\r\n", pub);
    assert_int_equal(curve_key_parse(text, strlen(text), "k", key, &err), 0);
    assert_string_equal(key, pub);
    /* the key alone, no newline at the end */
    assert_int_equal(curve_key_parse(pub, strlen(pub), "k", key, &err), 0);
    assert_string_equal(key, pub);
    /* a commented-out key is a comment; no key starts with '#' (nor '$': Z85's last two) */
    snprintf(text, sizeof text, "#%s\n%s\n", sec, pub);
    assert_int_equal(curve_key_parse(text, strlen(text), "k", key, &err), 0);
    assert_string_equal(key, pub);
    for (int i = 0; i < 2000; i++) {
        char p2[CURVE_KEY_Z85 + 1], s2[CURVE_KEY_Z85 + 1];
        assert_int_equal(zmq_curve_keypair(p2, s2), 0);
        assert_true(p2[0] != '#' && s2[0] != '#' && p2[0] != '$' && s2[0] != '$');
    }
    /* errors name the text and the line */
    snprintf(text, sizeof text, "# c\n%.39s\n", pub);
    assert_int_equal(curve_key_parse(text, strlen(text), "bad.key", key, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "bad.key:2"));
    assert_int_equal(curve_key_parse("# only a comment\n\n", 18, "empty.key", key, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "empty.key"));
    assert_int_equal(curve_key_parse("", 0, "e", key, &err), FL_EFORMAT);
    /* a text with bytes after its length is read only up to the length */
    snprintf(text, sizeof text, "%s", pub);
    assert_int_equal(curve_key_parse(text, 10, "cut", key, &err), FL_EFORMAT);
}

static void test_curve_key_read_files(void **state)
{
    (void)state;
    char path[512], key[CURVE_KEY_Z85 + 1];
    fl_error_t err = {0};
    snprintf(path, sizeof path, "%s/missing", g_dir);
    assert_int_equal(curve_key_read(path, key, &err), FL_EIO);
    assert_non_null(strstr(err.msg, "missing"));
    assert_int_equal(curve_key_read(NULL, key, &err), FL_EINVAL);
    /* too long to be a key file */
    snprintf(path, sizeof path, "%s/big", g_dir);
    char *big = malloc(10000);
    assert_non_null(big);
    memset(big, '#', 9999);
    big[9999] = 0;
    write_file(path, big);
    free(big);
    assert_int_equal(curve_key_read(path, key, &err), FL_EFORMAT);
}

static void test_curve_keygen_files(void **state)
{
    (void)state;
    char pub[CURVE_KEY_Z85 + 1], path[512], key[CURVE_KEY_Z85 + 1], derived[CURVE_KEY_Z85 + 1];
    fl_error_t err = {0};
    char dir[300];
    snprintf(dir, sizeof dir, "%s/keys", g_dir); /* made by keygen */
    assert_int_equal(curve_keygen(dir, "coord", pub, &err), 0);
    struct stat st;
    snprintf(path, sizeof path, "%s/coord.secret", dir);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(curve_key_read(path, key, &err), 0);
    assert_int_equal(curve_public_of(key, derived, &err), 0);
    assert_string_equal(derived, pub);
    snprintf(path, sizeof path, "%s/coord.public", dir);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);
    assert_int_equal(curve_key_read(path, key, &err), 0);
    assert_string_equal(key, pub);
    /* never overwritten, the existing pair left as it was */
    assert_int_not_equal(curve_keygen(dir, "coord", NULL, &err), 0);
    assert_non_null(strstr(err.msg, "exists"));
    assert_int_equal(curve_key_read(path, key, &err), 0);
    assert_string_equal(key, pub);
    /* names that could leave the directory or hide */
    const char *bad[] = {"", "../x", "a/b", ".hidden", "sp ace", "x\n"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (!curve_keygen(dir, bad[i], NULL, &err)) fail_msg("keygen took the name '%s'", bad[i]);
    assert_int_equal(curve_keygen(dir, "w-0_a.b", NULL, &err), 0);
}

/* A CURVE server and a client in one context (no ZAP handler bound: libzmq lets every key in). */
static bool one_message(const char *server_secret, const char *client_secret, const char *server_public_for_client)
{
    void *ctx = zmq_ctx_new();
    void *srv = zmq_socket(ctx, ZMQ_ROUTER), *cli = zmq_socket(ctx, ZMQ_DEALER);
    const int zero = 0;
    zmq_setsockopt(srv, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(cli, ZMQ_LINGER, &zero, sizeof zero);
    char ep[300];
    snprintf(ep, sizeof ep, "ipc://%s/link", g_dir);
    assert_int_equal(curve_server_setup(srv, server_secret, "test", NULL), 0);
    assert_int_equal(zmq_bind(srv, ep), 0);
    assert_int_equal(curve_client_setup(cli, client_secret, server_public_for_client, NULL), 0);
    assert_int_equal(zmq_connect(cli, ep), 0);
    zmq_send(cli, "hi", 2, 0);
    zmq_pollitem_t it = {srv, 0, ZMQ_POLLIN, 0};
    const bool got = zmq_poll(&it, 1, 1000) == 1;
    zmq_close(srv);
    zmq_close(cli);
    zmq_ctx_term(ctx);
    return got;
}

static void test_curve_link_needs_the_server_key(void **state)
{
    (void)state;
    char spub[41], ssec[41], cpub[41], csec[41], opub[41], osec[41];
    assert_int_equal(zmq_curve_keypair(spub, ssec), 0);
    assert_int_equal(zmq_curve_keypair(cpub, csec), 0);
    assert_int_equal(zmq_curve_keypair(opub, osec), 0);
    assert_true(one_message(ssec, csec, spub));
    assert_false(one_message(ssec, csec, opub)); /* the client expects another server */
    /* both key files or none */
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    fl_error_t err = {0};
    assert_int_equal(curve_client_setup_files(s, "x", NULL, &err), FL_EINVAL);
    assert_int_not_equal(curve_client_setup(s, "bad", spub, &err), 0);
    zmq_close(s);
    zmq_ctx_term(ctx);
}

int main(void)
{
    if (!curve_available()) {
        printf("skipped: this libzmq has no CURVE\n");
        return 77;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/folio_test_curve_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_curve_key_valid),
        cmocka_unit_test(test_curve_key_file_forms),
        cmocka_unit_test(test_curve_key_read_files),
        cmocka_unit_test(test_curve_keygen_files),
        cmocka_unit_test(test_curve_link_needs_the_server_key),
    };
    const int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
