/* router.h - the coordinator's routing policies, as pure functions over a table of group states.
 *
 * prefix (default): consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).
 * Each group owns ROUTER_VNODES points on a 64-bit ring (XXH3-64 of "name#i"); a request's key is
 * its prompt's block hash at depth min(full blocks, route_blocks), so prompts sharing their leading
 * blocks share a key and land on the group whose prefix cache holds those blocks. The walk goes
 * clockwise from the key and takes the first routable group whose in-flight count is below
 * max(load_floor, ceil(load_factor * (total in flight + 1) / routable groups)), so no group gets
 * more than c times the average and a hot prefix spills to its ring neighbours. The floor exists
 * because a worker batches: at light load a group running a few requests is not overloaded, and
 * the plain bound (1 when one request is in flight over 4 groups) would scatter a prefix over
 * every group's cache for nothing (measured in bench/README.md). round-robin and least-loaded (fewest
 * in flight, ties by name) are there for comparison.
 *
 * cache-aware: routes by what the groups report they hold (kv_index.h), in the manner of SGLang's
 * cache-aware router and Dynamo's KV router. The caller fills each group's cached_blocks, the
 * request's leading blocks that group holds; among the groups under the same load bound as prefix,
 * the pick is one with the longest match, ties going to the first of them clockwise from the key
 * (so requests sharing only a common head, a system prompt every group holds, still spread as
 * prefix spreads them). A group over the bound is passed over whatever it holds. When no group
 * under the bound holds any of the prompt, a new prefix is placed on the group holding the fewest of
 * the prefixes routed lately (the caller's census, prefixes), ties clockwise from the key: hashing
 * alone put 8 prefixes on 4 groups as 17/39/40/64 requests, and the group with 3-4 prefixes kept
 * evicting them (bench/README.md). Until its blocks are reported, later requests for the prefix follow
 * it (placed), as hashing would send them, instead of a census that may have moved meanwhile.
 *
 * A router_t holds only the ring and the round-robin cursor; the caller owns the group table and
 * passes it to every pick, so the functions are testable without sockets. One thread. */
#ifndef FOLIO_ROUTER_H
#define FOLIO_ROUTER_H

#include <stdbool.h>
#include <stdint.h>

#include "block_hash.h"
#include "error.h"

#define ROUTER_VNODES 100

typedef enum { ROUTER_PREFIX = 0, ROUTER_ROUND_ROBIN, ROUTER_LEAST_LOADED, ROUTER_CACHE_AWARE } router_policy_t;

/* One group as the router sees it; slot i of the table is the group the ring calls i. */
typedef struct router_group {
    const char *name;  /* borrowed */
    bool routable;     /* healthy and not draining */
    uint32_t inflight; /* requests routed there and not finished */
    uint32_t cached_blocks; /* cache-aware: the request's leading blocks this group holds (per pick) */
    uint32_t prefixes;      /* cache-aware: of the prefixes routed lately, how many this group holds
                             * (filled only when no group holds any of the request's blocks) */
    bool placed;            /* cache-aware: the request's prefix was placed here lately, not yet reported */
} router_group_t;

typedef struct router router_t;

router_t *router_new(router_policy_t policy, double load_factor, int load_floor, fl_error_t *err);
void router_destroy(router_t **rp);

/* Puts group slot's points on the ring (once per slot; a slot keeps its name). */
int router_add_group(router_t *r, int slot, const char *name, fl_error_t *err);

/* The routing key of a prompt: the hash of its block at depth min(n_hashes, route_blocks) when it has
 * a full block, else the hash of its tokens chained from salt. */
uint64_t router_key(const block_hash_t *hashes, int n_hashes, int route_blocks, block_hash_t salt,
                    const int32_t *tokens, int n_tokens);

/* The group slot for a request with this key, or -1 when no group is routable. Groups [0, n_groups)
 * of the table; exclude (-1 for none) is never picked. */
int router_pick(router_t *r, uint64_t key, const router_group_t *groups, int n_groups, int exclude);

router_policy_t router_policy(const router_t *r);
const char *router_policy_name(router_policy_t p);
/* "prefix", "round-robin", "least-loaded", "cache-aware" -> 0 and *out, else FL_EINVAL. */
int router_policy_parse(const char *s, router_policy_t *out);

#endif
