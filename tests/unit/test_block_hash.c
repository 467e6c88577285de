/* test_block_hash.c - the block identity shared by coordinator and workers (common/block_hash.c).
 *
 * Protects: the definition itself (pinned vectors of block_hash_salt, block_hash_next and
 * block_hash_prefix, computed outside folio: a change here changes the protocol, and coordinators
 * and workers of different builds would stop agreeing), that it is XXH3-128 over the documented
 * byte layout (rebuilt here with the library), the chaining (equal prefixes give equal
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

/* Vectors of folio's own functions, computed outside folio and its xxHash copy: Python 3.11 with the
 * xxhash package 4.1.0 (libxxhash 0.8.4), from the definition in block_hash.h:
 *   M = 2**64 - 1
 *   def h128(b): v = xxhash.xxh3_128(b).intdigest(); return (v & M, v >> 64)      # (lo, hi)
 *   def salt(tenant): return h128(b"folio-tenant:" + tenant)
 *   def next(parent, toks): return h128(struct.pack("<QQ", *parent) + b"".join(struct.pack("<i", t) for t in toks))
 * The 65-token block crosses block_hash_next's 64-token buffer and starts with a negative id. */
#define H(lo, hi) ((block_hash_t){lo##ULL, hi##ULL})
static void salt_and_next_equal_independent_vectors(void **state)
{
    (void)state;
    const block_hash_t d = block_hash_salt(NULL, 0), acme = block_hash_salt("acme", 4);
    assert_true(block_hash_equal(d, H(0xffaa5f2ad6f929f7, 0xeed4d53477d53edb)));
    assert_true(block_hash_equal(acme, H(0x4a219b45a761a202, 0x814099fc85c61ab8)));
    assert_true(block_hash_equal(block_hash_next(d, NULL, 0), H(0x79484bf91a05a2f2, 0xd3b4c50704b562cf)));
    const int32_t three[] = {1, 9690, 198};
    const block_hash_t h1 = block_hash_next(d, three, 3);
    assert_true(block_hash_equal(h1, H(0xdc9f7ba619d56eee, 0x9972293918c2c168)));
    int32_t t[200];
    for (int i = 0; i < 16; i++) t[i] = i;
    assert_true(block_hash_equal(block_hash_next(acme, t, 16), H(0x03cec62e5806f957, 0x9fdac4f23c439e1f)));
    for (int i = 0; i < 65; i++) t[i] = i * 7919 - 3;
    assert_true(block_hash_equal(block_hash_next(h1, t, 65), H(0x96b6172e23111b41, 0xd603b044dfa2ee13)));
    for (int i = 0; i < 200; i++) t[i] = (int32_t)(((uint64_t)i * 2654435761u) % 49152);
    assert_true(block_hash_equal(block_hash_next(acme, t, 200), H(0xb5c4a5979ab2f128, 0xeca429563f1f0e7a)));
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
    /* Computed as above: next(next(salt(b""), tokens[:16]), tokens[16:]); proto/README.md "Block hashes". */
    assert_true(block_hash_equal(h[0], H(0xc961121179b7808f, 0xc0193d2ae5f14587)));
    assert_true(block_hash_equal(h[1], H(0xf4cb97b49a2a2e39, 0x97989d423885af65)));
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
        cmocka_unit_test(salt_and_next_equal_independent_vectors),
        cmocka_unit_test(block_hash_is_xxh3_128_over_the_documented_bytes),
        cmocka_unit_test(pinned_vectors_do_not_change),
        cmocka_unit_test(equal_prefixes_chain_equally_and_differences_propagate),
        cmocka_unit_test(tenants_never_share_a_chain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
