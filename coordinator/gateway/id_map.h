/* id_map.h - a map from request ids (non-zero uint64) to pointers: the gateway's table from the
 * coordinator's reply ids to the HTTP requests waiting for them.
 *
 * Open addressing with linear probing and backward-shift deletion (no tombstones, so a map that
 * sees millions of short-lived ids never degrades); it doubles when half full. Not thread-safe: it
 * belongs to the thread that owns the client connection. */
#ifndef FOLIO_GW_ID_MAP_H
#define FOLIO_GW_ID_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct id_map id_map_t;

id_map_t *id_map_new(void);
void id_map_destroy(id_map_t **mp);
/* Inserts or replaces; id must not be 0. Returns 0, or FL_ENOMEM (the map is unchanged). */
int id_map_put(id_map_t *m, uint64_t id, void *value);
/* The value under id, NULL when absent. */
void *id_map_get(const id_map_t *m, uint64_t id);
/* Removes id; returns its value (NULL when absent). */
void *id_map_take(id_map_t *m, uint64_t id);
size_t id_map_size(const id_map_t *m);

#endif
