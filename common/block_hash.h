/* block_hash.h - the prefix-cache identity of a full KV block, shared by coordinator and workers.
 *
 * hash(block i) = XXH3-128(hash(block i-1) || token ids of block i), each token as 4 little-endian
 * bytes; the chain starts from the tenant's salt, hash("folio-tenant:" || tenant), so tenants never
 * share blocks. Equal prefixes (same tenant, same tokens, same block size) give equal chains, which
 * is what lets the coordinator route by the blocks a worker will find cached. 128 bits name the
 * block; the worker still compares the tokens on a hit. tests/unit/test_block_hash.c pins vectors:
 * changing this definition changes the protocol. */
#ifndef FOLIO_BLOCK_HASH_H
#define FOLIO_BLOCK_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct block_hash {
    uint64_t lo, hi;
} block_hash_t;

/* The chain's root for a tenant (NULL or "" is the default tenant). */
block_hash_t block_hash_salt(const char *tenant, size_t len);
/* The hash of a block of n tokens following the block (or salt) whose hash is parent. */
block_hash_t block_hash_next(block_hash_t parent, const int32_t *tokens, int n);
/* Hashes of the full blocks of a prompt: out[i] for tokens [0, (i+1)*block_size). Returns how many
 * (n_tokens / block_size, at most cap). */
int block_hash_prefix(block_hash_t salt, const int32_t *tokens, int n_tokens, int block_size, block_hash_t *out,
                      int cap);

static inline bool block_hash_equal(block_hash_t a, block_hash_t b) { return a.lo == b.lo && a.hi == b.hi; }

#endif
