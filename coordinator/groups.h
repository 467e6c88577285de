/* groups.h - the registry of worker groups: members by rank, their identities, last load, health.
 *
 * A group appears when its first worker sends READY and keeps its slot for the life of the process
 * (slots index the router's table and ring); a dead group keeps its record with no members, so Status
 * still shows it and a re-registering worker finds its slot again. A group is healthy when its rank 0
 * is registered, was heard within the liveness window and its last WorkerLoad said engine_ok, and
 * (tensor parallelism) every one of its tp_size ranks is registered; it is routable when also not
 * draining. Groups are few, so lookups by identity or name are linear scans.
 * One thread (the event loop) owns the registry. */
#ifndef FOLIO_GROUPS_H
#define FOLIO_GROUPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "curve.h"
#include "folio.pb-c.h"
#include "router.h"
#include "wire.h"

#define GROUPS_MAX      256
#define GROUP_MAX_RANKS 16
#define GROUP_NAME_MAX  256

typedef struct group_member {
    bool present;
    uint8_t identity[WIRE_MAX_IDENTITY];
    uint8_t identity_len;
    uint64_t epoch;
    double last_seen;
    uint32_t restarts; /* its WorkerHello.restarts */
} group_member_t;

#define GROUP_COMM_ID_MAX 160 /* WorkerHello.comm_id: a comm_id_t (worker/comm.h) is 129 bytes */

typedef struct group {
    char name[GROUP_NAME_MAX + 1];
    char model_id[GROUP_NAME_MAX + 1];
    uint32_t tp_size, kv_blocks, block_size;
    /* the longest sequence (prompt + completion) it can serve: WorkerHello.max_context, and never
     * more than its KV cache holds (kv_blocks x block_size) */
    uint32_t max_context;
    uint32_t restarts;          /* WorkerHello.restarts of rank 0: times its supervisor restarted it */
    char kv_type[16];           /* WorkerHello.kv_type and kv_bytes_per_token of rank 0 */
    uint32_t kv_bytes_per_token;
    char kv_peer[WIRE_MAX_IDENTITY + 1]; /* WorkerHello.kv_peer_endpoint of rank 0: where it serves KV pulls */
    char kv_peer_key[CURVE_KEY_Z85 + 1]; /* the CURVE key rank 0 connected with ("" without CURVE): its
                                            peer socket's key, which pullers must expect */
    uint8_t comm_id[GROUP_COMM_ID_MAX]; /* rank 0's communicator id (tp_size > 1), for the other ranks */
    size_t comm_id_len;
    group_member_t ranks[GROUP_MAX_RANKS];
    Folio__V1__WorkerLoad load; /* last HEARTBEAT of rank 0 (flat: no pointers) */
    bool have_load;
    bool draining;
    bool healthy;
} group_t;

typedef struct groups {
    group_t g[GROUPS_MAX];
    router_group_t table[GROUPS_MAX]; /* what the router sees, kept in step with g */
    int n;
} groups_t;

void groups_init(groups_t *gs);
int groups_find(const groups_t *gs, const char *name);
/* Slot and rank of the worker with this identity, or -1. */
int groups_find_member(const groups_t *gs, const uint8_t *identity, size_t len, int *rank);

/* Registers the READY sender. Returns the slot (a new slot sets *is_new), or FL_ERANGE when the
 * registry or the rank table is full. *replaced is set when rank 0 changed identity or re-registered
 * (its in-flight work is gone). */
int groups_register(groups_t *gs, const Folio__V1__WorkerHello *h, const uint8_t *identity, size_t len, double now,
                    bool *is_new, bool *replaced);
/* Forgets every member of group slot (it died); the record stays. */
void groups_forget(groups_t *gs, int slot);
/* Forgets one member. */
void groups_forget_member(groups_t *gs, int slot, int rank);
void groups_set_load(groups_t *gs, int slot, const Folio__V1__WorkerLoad *l);
void groups_set_draining(groups_t *gs, int slot, bool draining);
/* Recomputes health and routability of slot. */
void groups_refresh(groups_t *gs, int slot);

int groups_healthy_count(const groups_t *gs);
bool groups_serving(const groups_t *gs); /* a healthy undrained group exists */
/* The longest context (group_t.max_context) any routable group serves (0 when none is routable). */
uint32_t groups_max_context(const groups_t *gs);

#endif
