/* test_host_port.c - common/host_port.c: "[ADDR:]PORT" as --http spells it, and the address a
 * client on this machine connects to for a listening one. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "host_port.h"

static void test_host_port_forms(void **state)
{
    (void)state;
    char host[64];
    int port = 0;
    assert_int_equal(fl_host_port_parse("8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "");
    assert_int_equal(port, 8080);
    assert_int_equal(fl_host_port_parse("0.0.0.0:9000", host, sizeof host, &port), 0);
    assert_string_equal(host, "0.0.0.0");
    assert_int_equal(port, 9000);
    assert_int_equal(fl_host_port_parse("localhost:1", host, sizeof host, &port), 0);
    assert_string_equal(host, "localhost");
    assert_int_equal(fl_host_port_parse("[::1]:65535", host, sizeof host, &port), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 65535);
    const char *bad[] = {
        "", "0", "65536", "-1", "+80", "80x", "host:", ":", "::1:80", "[::1]80", "[::1", "a:b:80", "http://x:80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (!fl_host_port_parse(bad[i], host, sizeof host, &port)) fail_msg("accepted '%s'", bad[i]);
    char small[4];
    assert_int_not_equal(fl_host_port_parse("longhost:80", small, sizeof small, &port), 0);
    assert_string_equal(fl_host_port_local(""), "127.0.0.1");
    assert_string_equal(fl_host_port_local("0.0.0.0"), "127.0.0.1");
    assert_string_equal(fl_host_port_local("::"), "::1");
    assert_string_equal(fl_host_port_local("10.1.2.3"), "10.1.2.3");
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_host_port_forms)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
