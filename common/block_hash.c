/* block_hash.c - chained XXH3-128 block hashes; see block_hash.h. */
#include "block_hash.h"

#include <string.h>

#define XXH_INLINE_ALL /* header-only: no link dependency, and the compiler sees the whole hash */
#include <xxhash.h>

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

block_hash_t block_hash_salt(const char *tenant, size_t len)
{
    static const char tag[] = "folio-tenant:";
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, tag, sizeof tag - 1);
    if (tenant && len) XXH3_128bits_update(&st, tenant, len);
    const XXH128_hash_t h = XXH3_128bits_digest(&st);
    return (block_hash_t){h.low64, h.high64};
}

block_hash_t block_hash_next(block_hash_t parent, const int32_t *tokens, int n)
{
    /* Up to 64 tokens are hashed from one stack buffer; longer blocks stream. */
    uint8_t buf[16 + 4 * 64];
    put_le64(buf, parent.lo);
    put_le64(buf + 8, parent.hi);
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    size_t used = 16;
    for (int i = 0; i < n; i++) {
        const uint32_t t = (uint32_t)tokens[i];
        buf[used++] = (uint8_t)t;
        buf[used++] = (uint8_t)(t >> 8);
        buf[used++] = (uint8_t)(t >> 16);
        buf[used++] = (uint8_t)(t >> 24);
        if (used == sizeof buf) {
            XXH3_128bits_update(&st, buf, used);
            used = 0;
        }
    }
    if (used) XXH3_128bits_update(&st, buf, used);
    const XXH128_hash_t h = XXH3_128bits_digest(&st);
    return (block_hash_t){h.low64, h.high64};
}

int block_hash_prefix(block_hash_t salt, const int32_t *tokens, int n_tokens, int block_size, block_hash_t *out,
                      int cap)
{
    if (block_size <= 0 || n_tokens <= 0) return 0;
    int n = n_tokens / block_size;
    if (n > cap) n = cap;
    block_hash_t h = salt;
    for (int i = 0; i < n; i++) out[i] = h = block_hash_next(h, tokens + (size_t)i * block_size, block_size);
    return n;
}
