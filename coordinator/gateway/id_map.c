/* id_map.c - see id_map.h. */
#include "id_map.h"

#include <stdbool.h>
#include <stdlib.h>

#include "error.h"

typedef struct slot {
    uint64_t id; /* 0: empty */
    void *value;
} slot_t;

struct id_map {
    slot_t *slots;
    size_t cap; /* a power of two */
    size_t n;
};

/* The ids are mostly consecutive: a multiplicative hash spreads them over the table. */
static size_t home(const id_map_t *m, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 17) & (m->cap - 1);
}

id_map_t *id_map_new(void)
{
    id_map_t *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cap = 64;
    if (!(m->slots = calloc(m->cap, sizeof *m->slots))) {
        free(m);
        return NULL;
    }
    return m;
}

void id_map_destroy(id_map_t **mp)
{
    if (!mp || !*mp) return;
    free((*mp)->slots);
    free(*mp);
    *mp = NULL;
}

static slot_t *find(const id_map_t *m, uint64_t id)
{
    for (size_t i = home(m, id);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].id == id) return &m->slots[i];
        if (!m->slots[i].id) return NULL;
    }
}

static void insert_new(id_map_t *m, uint64_t id, void *value)
{
    size_t i = home(m, id);
    while (m->slots[i].id) i = (i + 1) & (m->cap - 1);
    m->slots[i] = (slot_t){id, value};
    m->n++;
}

static int grow(id_map_t *m)
{
    slot_t *old = m->slots;
    const size_t old_cap = m->cap;
    slot_t *s = calloc(old_cap * 2, sizeof *s);
    if (!s) return FL_ENOMEM;
    m->slots = s;
    m->cap = old_cap * 2;
    m->n = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].id) insert_new(m, old[i].id, old[i].value);
    free(old);
    return FL_OK;
}

int id_map_put(id_map_t *m, uint64_t id, void *value)
{
    if (!m || !id) return FL_EINVAL;
    slot_t *s = find(m, id);
    if (s) {
        s->value = value;
        return FL_OK;
    }
    if ((m->n + 1) * 2 > m->cap && grow(m)) return FL_ENOMEM;
    insert_new(m, id, value);
    return FL_OK;
}

void *id_map_get(const id_map_t *m, uint64_t id)
{
    if (!m || !id) return NULL;
    const slot_t *s = find(m, id);
    return s ? s->value : NULL;
}

void *id_map_take(id_map_t *m, uint64_t id)
{
    if (!m || !id) return NULL;
    slot_t *s = find(m, id);
    if (!s) return NULL;
    void *value = s->value;
    /* Backward shift: move later members of the probe run into the hole when their home allows. */
    size_t hole = (size_t)(s - m->slots);
    for (size_t i = (hole + 1) & (m->cap - 1); m->slots[i].id; i = (i + 1) & (m->cap - 1)) {
        const size_t h = home(m, m->slots[i].id);
        /* The entry at i may fill the hole when its home is not in (hole, i] cyclically. */
        const bool stays = hole <= i ? (h > hole && h <= i) : (h > hole || h <= i);
        if (stays) continue;
        m->slots[hole] = m->slots[i];
        hole = i;
    }
    m->slots[hole] = (slot_t){0, NULL};
    m->n--;
    return value;
}

size_t id_map_size(const id_map_t *m)
{
    return m ? m->n : 0;
}
