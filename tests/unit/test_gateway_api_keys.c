/* test_gateway_api_keys.c - coordinator/gateway/api_keys.c: the key file's lines (comments, blank
 * lines, extra white space), what it refuses (a key without a tenant, extra fields, a repeated
 * key, no key at all), and the Authorization header matched to a tenant (the scheme in any case;
 * a prefix, an extension or another scheme of a key matches nothing). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api_keys.h"

static void test_keys_map_to_tenants(void **state)
{
    (void)state;
    fl_error_t err = {0};
    api_keys_t *k =
        api_keys_parse("# keys\nsk-alpha team-a\n\n  sk-beta\tteam-b  \r\n#sk-gamma nope\nsk-alphabet c", "keys", &err);
    assert_non_null(k);
    assert_int_equal(api_keys_count(k), 3);
    assert_string_equal(api_keys_tenant(k, "Bearer sk-alpha"), "team-a");
    assert_string_equal(api_keys_tenant(k, "bearer sk-beta"), "team-b");
    assert_string_equal(api_keys_tenant(k, "BEARER  sk-alphabet "), "c");
    assert_null(api_keys_tenant(k, "Bearer sk-alph"));
    assert_null(api_keys_tenant(k, "Bearer sk-alpha2"));
    assert_null(api_keys_tenant(k, "Bearer sk-gamma"));
    assert_null(api_keys_tenant(k, "Basic sk-alpha"));
    assert_null(api_keys_tenant(k, "sk-alpha"));
    assert_null(api_keys_tenant(k, "Bearer "));
    assert_null(api_keys_tenant(k, NULL));
    api_keys_destroy(&k);
    assert_null(k);
    api_keys_destroy(&k);
}

static void test_bad_key_files_are_refused_naming_the_line(void **state)
{
    (void)state;
    const char *bad[] = {"sk-a\n", "sk-a t extra\n", "sk-a t\nsk-a u\n", "# only a comment\n\n", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        fl_error_t err = {0};
        if (api_keys_parse(bad[i], "keys.txt", &err)) fail_msg("accepted: '%s'", bad[i]);
        assert_non_null(strstr(err.msg, "keys.txt"));
    }
    fl_error_t err = {0};
    assert_null(api_keys_load("/nonexistent/keys", &err));
    assert_non_null(strstr(err.msg, "/nonexistent/keys"));
    char path[] = "/tmp/folio-test-keys-XXXXXX";
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "k1 t1\n", 6), 6);
    close(fd);
    api_keys_t *k = api_keys_load(path, &err);
    unlink(path);
    assert_non_null(k);
    assert_string_equal(api_keys_tenant(k, "Bearer k1"), "t1");
    api_keys_destroy(&k);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_map_to_tenants),
        cmocka_unit_test(test_bad_key_files_are_refused_naming_the_line),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
