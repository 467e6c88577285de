/* test_block_hash.c - the block identity shared by coordinator and workers (common/block_hash.c).
 *
 * Protects: the definition itself (pinned vectors: a change here changes the protocol, and
 * coordinators and workers of different builds would stop agreeing), that it is XXH3-128 over the
 * documented byte layout (rebuilt here independently), the chaining (equal prefixes give equal
 * chains, a change in any earlier block changes every later hash), and tenant separation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "block_hash.h"

static void xxh3_128_is_the_reference_function(void **state)
{
    (void)state;
    /* xxHash's published XXH128 of the empty input. */
    const XXH128_hash_t h = XXH3_128bits("", 0);
    assert_true(h.high64 == 0x99aa06d3014798d8ULL && h.low64 == 0x6001c324468d497fULL);
}

static void block_hash_is_xxh3_128_over_the_documented_bytes(void **state)
{
    (void)state;
    const block_hash_t salt = block_hash_salt("acme", 4);
    const XXH128_hash_t s = XXH3_128bits("folio-tenant:acme", 17);
    assert_true(salt.lo == s.low64 && salt.hi == s.high64);
    int32_t tokens[100];
    for (int i = 0; i < 100; i++) tokens[i] = i * 7919 - 3; /* negative first id: bytes are two's complement */
    for (int n = 0; n <= 100; n += 1) {
        uint8_t bytes[16 + 400];
        for (int i = 0; i < 8; i++) {
            bytes[i] = (uint8_t)(salt.lo >> (8 * i));
            bytes[8 + i] = (uint8_t)(salt.hi >> (8 * i));
        }
        for (int i = 0; i < n; i++)
            for (int b = 0; b < 4; b++) bytes[16 + 4 * i + b] = (uint8_t)((uint32_t)tokens[i] >> (8 * b));
        const XXH128_hash_t want = XXH3_128bits(bytes, 16 + 4 * (size_t)n);
        const block_hash_t got = block_hash_next(salt, tokens, n);
        assert_true(got.lo == want.low64 && got.hi == want.high64);
    }
}

static void pinned_vectors_do_not_change(void **state)
{
    (void)state;
    const int32_t tokens[32] = {1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3717, 28, 7018, 411, 407,
                                19712, 8182, 2, 198, 1, 4093, 198, 19556, 30, 2, 198, 1, 520, 9531, 198, 17, 42};
    block_hash_t h[2];
    assert_int_equal(block_hash_prefix(block_hash_salt(NULL, 0), tokens, 32, 16, h, 2), 2);
    /* Printed once from this definition; see proto/README.md "Block hashes". */
    assert_true(h[0].lo == 0xc961121179b7808fULL && h[0].hi == 0xc0193d2ae5f14587ULL);
    assert_true(h[1].lo == 0xf4cb97b49a2a2e39ULL && h[1].hi == 0x97989d423885af65ULL);
}

static void equal_prefixes_chain_equally_and_differences_propagate(void **state)
{
    (void)state;
    int32_t a[64], b[64];
    for (int i = 0; i < 64; i++) a[i] = b[i] = 1000 + i;
    b[40] = 7; /* differs in the third block of 16 */
    block_hash_t ha[4], hb[4];
    const block_hash_t salt = block_hash_salt("", 0);
    assert_int_equal(block_hash_prefix(salt, a, 64, 16, ha, 4), 4);
    assert_int_equal(block_hash_prefix(salt, b, 64, 16, hb, 4), 4);
    assert_true(block_hash_equal(ha[0], hb[0]) && block_hash_equal(ha[1], hb[1]));
    assert_false(block_hash_equal(ha[2], hb[2]));
    assert_false(block_hash_equal(ha[3], hb[3])); /* chained: block 3 is equal, its parent is not */
    /* Only full blocks are hashed, and cap bounds the output. */
    assert_int_equal(block_hash_prefix(salt, a, 47, 16, ha, 4), 2);
    assert_int_equal(block_hash_prefix(salt, a, 64, 16, ha, 1), 1);
    assert_int_equal(block_hash_prefix(salt, a, 10, 16, ha, 4), 0);
}

static void tenants_never_share_a_chain(void **state)
{
    (void)state;
    int32_t t[16];
    for (int i = 0; i < 16; i++) t[i] = i;
    const block_hash_t d = block_hash_salt(NULL, 0), e = block_hash_salt("", 0), x = block_hash_salt("x", 1),
                       y = block_hash_salt("y", 1);
    assert_true(block_hash_equal(d, e)); /* no tenant is the default tenant */
    assert_false(block_hash_equal(x, y));
    assert_false(block_hash_equal(block_hash_next(x, t, 16), block_hash_next(y, t, 16)));
    assert_false(block_hash_equal(block_hash_next(d, t, 16), block_hash_next(x, t, 16)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(xxh3_128_is_the_reference_function),
        cmocka_unit_test(block_hash_is_xxh3_128_over_the_documented_bytes),
        cmocka_unit_test(pinned_vectors_do_not_change),
        cmocka_unit_test(equal_prefixes_chain_equally_and_differences_propagate),
        cmocka_unit_test(tenants_never_share_a_chain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
