/* gguf.c - GGUF v2/v3 reader: mmap the file, validate all of it, then hand out borrowed pointers.
 *
 * Layout (little-endian): "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv key/value pairs
 * (u64-length key, u32 value type, value), then n_tensors tensor infos (u64-length name, u32 n_dims,
 * n_dims x i64 ne, u32 type, u64 offset), padding to general.alignment (default 32), and the tensor
 * data section, in which each tensor's offset is relative to the section start.
 *
 * gguf_open_memory() walks the whole header once with a bounds-checked cursor (every read checks the
 * bytes left, every count is checked against the bytes it needs before anything is allocated, every
 * multiplication is overflow-checked), records where each value lives, indexes string arrays (so
 * gguf_arr_str is O(1)) and puts keys and tensor names in open-addressing hash tables, which also
 * catch duplicates. Nothing is read from the mapping after open except through those checked records.
 * Tensor types are accepted when their ggml block size is known (so a K-quant file opens and the model
 * loader can say the type is unsupported); numbers ggml never used or removed are an error. */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dtype.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_MAX_STRING (1ull << 30) /* 1 GiB: no sane value is longer */
#define GGUF_MAX_KEY 65535
#define GGUF_MAX_NAME 1024

typedef struct {
    char *key;                 /* NUL-terminated copy */
    gguf_value_type_t type;
    const uint8_t *val;        /* scalar: its bytes; string: its chars; array: first element */
    uint64_t len;              /* string: bytes; array: element count */
    gguf_value_type_t elem_type;
    uint64_t *str_off;         /* string arrays: offset in the image of each element's u64 length */
} kv_t;

struct gguf {
    char *path;
    const uint8_t *base;
    size_t size;
    void *map; /* non-NULL when we own an mmap of `size` bytes */
    uint32_t version;
    size_t alignment;
    size_t data_offset;
    int64_t n_kv;
    kv_t *kv;
    int64_t n_tensors;
    gguf_tensor_t *tensors;
    int64_t *kv_index; /* hash slots holding index + 1; 0 = empty */
    size_t kv_cap;
    int64_t *t_index;
    size_t t_cap;
};

/* ggml's type table: elements per block and bytes per block; 0 bytes = number not in use. */
static const struct {
    const char *name;
    int blck;
    int size;
} ggml_types[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},     [4] = {"Q4_2", 0, 0},        [5] = {"Q4_3", 0, 0},
    [6] = {"Q5_0", 32, 22},     [7] = {"Q5_1", 32, 24},      [8] = {"Q8_0", 32, 34},
    [9] = {"Q8_1", 0, 0}, /* folio's Q8_1 block (f32 d, s) differs from ggml's (f16): never a weight */
    [10] = {"Q2_K", 256, 84},   [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},
    [13] = {"Q5_K", 256, 176},  [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},
    [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74}, [18] = {"IQ3_XXS", 256, 98},
    [19] = {"IQ1_S", 256, 50},  [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},  [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},
    [25] = {"I16", 1, 2},       [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},
    [28] = {"F64", 1, 8},       [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},
    [31] = {"Q4_0_4_4", 0, 0},  [32] = {"Q4_0_4_8", 0, 0},   [33] = {"Q4_0_8_8", 0, 0},
    [34] = {"TQ1_0", 256, 54},  [35] = {"TQ2_0", 256, 66},   [36] = {"IQ4_NL_4_4", 0, 0},
    [37] = {"IQ4_NL_4_8", 0, 0}, [38] = {"IQ4_NL_8_8", 0, 0}, [39] = {"MXFP4", 32, 17},
};
#define N_GGML_TYPES (int)(sizeof ggml_types / sizeof ggml_types[0])

const char *gguf_type_name(gguf_value_type_t t)
{
    static const char *names[] = {"uint8", "int8",  "uint16", "int16",  "uint32", "int32", "float32",
                                  "bool",  "string", "array", "uint64", "int64",  "float64"};
    return (unsigned)t < sizeof names / sizeof names[0] ? names[t] : "?";
}

size_t gguf_type_size(gguf_value_type_t t)
{
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

/* ---- bounds-checked cursor ---- */

typedef struct {
    const uint8_t *p;
    size_t size, pos;
    const char *name;
    fl_error_t *err;
} rd_t;

static int rd_bytes(rd_t *r, uint64_t n, const uint8_t **out, const char *what)
{
    if (n > r->size - r->pos)
        return fl_fail(r->err, FL_EFORMAT,
                       "%s: truncated: %s at offset %zu needs %llu bytes but only %zu remain (file size %zu)",
                       r->name, what, r->pos, (unsigned long long)n, r->size - r->pos, r->size);
    *out = r->p + r->pos;
    r->pos += (size_t)n;
    return 0;
}

static uint32_t le32(const uint8_t *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }

static int rd_u32(rd_t *r, uint32_t *v, const char *what)
{
    const uint8_t *b = NULL;
    int rc = rd_bytes(r, 4, &b, what);
    if (rc == 0) *v = le32(b);
    return rc;
}

static uint64_t le64(const uint8_t *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | b[i];
    return v;
}

static int rd_u64(rd_t *r, uint64_t *v, const char *what)
{
    const uint8_t *b = NULL;
    int rc = rd_bytes(r, 8, &b, what);
    if (rc == 0) *v = le64(b);
    return rc;
}

/* A u64-length string; `what` names it in errors. */
static int rd_str(rd_t *r, uint64_t max, const uint8_t **s, uint64_t *len, const char *what)
{
    const size_t at = r->pos;
    int rc = rd_u64(r, len, what);
    if (rc) return rc;
    if (*len > max || *len > r->size - r->pos)
        return fl_fail(r->err, FL_EFORMAT, "%s: %s at offset %zu has length %llu, past the end of the file (size %zu)%s",
                       r->name, what, at, (unsigned long long)*len, r->size,
                       *len > max ? " or over the length limit" : "");
    return rd_bytes(r, *len, s, what);
}

/* NUL-terminated copy of a name; rejects empty names and embedded NULs. */
static int copy_name(rd_t *r, const uint8_t *s, uint64_t len, char **out, const char *what, int64_t idx)
{
    if (len == 0) return fl_fail(r->err, FL_EFORMAT, "%s: %s #%lld has an empty name", r->name, what, (long long)idx);
    if (memchr(s, 0, (size_t)len))
        return fl_fail(r->err, FL_EFORMAT, "%s: %s #%lld name contains a NUL byte", r->name, what, (long long)idx);
    *out = malloc((size_t)len + 1);
    if (!*out) return fl_fail(r->err, FL_ENOMEM, "%s: out of memory", r->name);
    memcpy(*out, s, (size_t)len);
    (*out)[len] = 0;
    return 0;
}

/* ---- hash index ---- */

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static size_t index_cap(int64_t n)
{
    size_t cap = 16;
    while (cap < (size_t)n * 2) cap *= 2;
    return cap;
}

/* Inserts item i named `name`; returns the index of an existing item with that name, or -1. */
static int64_t index_insert(int64_t *slots, size_t cap, int64_t i, const char *name, const char *(*name_of)(const void *, int64_t),
                            const void *ctx)
{
    for (size_t h = hash_str(name) & (cap - 1);; h = (h + 1) & (cap - 1)) {
        if (slots[h] == 0) {
            slots[h] = i + 1;
            return -1;
        }
        if (strcmp(name_of(ctx, slots[h] - 1), name) == 0) return slots[h] - 1;
    }
}

static int64_t index_find(const int64_t *slots, size_t cap, const char *name, const char *(*name_of)(const void *, int64_t),
                          const void *ctx)
{
    if (!slots || !name) return -1;
    for (size_t h = hash_str(name) & (cap - 1);; h = (h + 1) & (cap - 1)) {
        if (slots[h] == 0) return -1;
        if (strcmp(name_of(ctx, slots[h] - 1), name) == 0) return slots[h] - 1;
    }
}

static const char *kv_name_of(const void *g, int64_t i) { return ((const gguf_t *)g)->kv[i].key; }
static const char *tensor_name_of(const void *g, int64_t i) { return ((const gguf_t *)g)->tensors[i].name; }

/* ---- parsing ---- */

static int parse_value(rd_t *r, kv_t *kv)
{
    int rc;
    const uint8_t *b = NULL;
    const size_t esz = gguf_type_size(kv->type);
    switch (kv->type) {
    case GGUF_TYPE_BOOL:
        if ((rc = rd_bytes(r, 1, &kv->val, "bool value"))) return rc;
        if (*kv->val > 1)
            return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' has bool value %u (must be 0 or 1)", r->name, kv->key, *kv->val);
        return 0;
    case GGUF_TYPE_STRING:
        return rd_str(r, GGUF_MAX_STRING, &kv->val, &kv->len, "string value");
    case GGUF_TYPE_ARRAY: {
        uint32_t et;
        if ((rc = rd_u32(r, &et, "array element type"))) return rc;
        if ((rc = rd_u64(r, &kv->len, "array length"))) return rc;
        kv->elem_type = (gguf_value_type_t)et;
        if (et == GGUF_TYPE_ARRAY)
            return fl_fail(r->err, FL_EUNSUPPORTED, "%s: key '%s' is a nested array (not supported)", r->name, kv->key);
        const size_t left = r->size - r->pos;
        if (et == GGUF_TYPE_STRING) {
            if (kv->len > left / 8)
                return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' claims %llu strings but only %zu bytes remain (file size %zu)",
                               r->name, kv->key, (unsigned long long)kv->len, left, r->size);
            kv->val = r->p + r->pos;
            kv->str_off = malloc(kv->len ? (size_t)kv->len * sizeof *kv->str_off : 1);
            if (!kv->str_off) return fl_fail(r->err, FL_ENOMEM, "%s: out of memory indexing key '%s'", r->name, kv->key);
            for (uint64_t i = 0; i < kv->len; i++) {
                uint64_t len;
                char what[256];
                kv->str_off[i] = r->pos;
                if (r->size - r->pos < 8 || le64(r->p + r->pos) > r->size - r->pos - 8) {
                    snprintf(what, sizeof what, "element %llu of key '%s'", (unsigned long long)i, kv->key);
                    return rd_str(r, GGUF_MAX_STRING, &b, &len, what);
                }
                r->pos += 8 + (size_t)le64(r->p + r->pos);
            }
            return 0;
        }
        const size_t ez = gguf_type_size((gguf_value_type_t)et);
        if (ez == 0)
            return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' is an array of unknown value type %u", r->name, kv->key, et);
        if (kv->len > left / ez)
            return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' claims %llu elements of %zu bytes but only %zu bytes remain (file size %zu)",
                           r->name, kv->key, (unsigned long long)kv->len, ez, left, r->size);
        if ((rc = rd_bytes(r, kv->len * ez, &kv->val, "array data"))) return rc;
        if (et == GGUF_TYPE_BOOL)
            for (uint64_t i = 0; i < kv->len; i++)
                if (kv->val[i] > 1)
                    return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' element %llu has bool value %u (must be 0 or 1)", r->name,
                                   kv->key, (unsigned long long)i, kv->val[i]);
        return 0;
    }
    default:
        if (esz == 0)
            return fl_fail(r->err, FL_EFORMAT, "%s: key '%s' has unknown value type %u", r->name, kv->key, (unsigned)kv->type);
        return rd_bytes(r, esz, &kv->val, "value");
    }
}

static int parse_kvs(gguf_t *g, rd_t *r, uint64_t n_kv)
{
    int rc;
    /* smallest pair: u64 key length + 1 key byte + u32 type + 1 value byte */
    if (n_kv > (r->size - r->pos) / 14)
        return fl_fail(r->err, FL_EFORMAT, "%s: header claims %llu metadata keys but the file (size %zu) cannot hold them",
                       r->name, (unsigned long long)n_kv, r->size);
    g->kv = calloc(n_kv ? (size_t)n_kv : 1, sizeof *g->kv);
    g->kv_cap = index_cap((int64_t)n_kv);
    g->kv_index = calloc(g->kv_cap, sizeof *g->kv_index);
    if (!g->kv || !g->kv_index) return fl_fail(r->err, FL_ENOMEM, "%s: out of memory", r->name);
    for (uint64_t i = 0; i < n_kv; i++) {
        kv_t *kv = &g->kv[i];
        const uint8_t *s;
        uint64_t len;
        uint32_t type;
        if ((rc = rd_str(r, GGUF_MAX_KEY, &s, &len, "key name"))) return rc;
        if ((rc = copy_name(r, s, len, &kv->key, "key", (int64_t)i))) return rc;
        g->n_kv = (int64_t)i + 1; /* from here kv->key is owned and freed by gguf_destroy */
        if ((rc = rd_u32(r, &type, "value type"))) return rc;
        kv->type = (gguf_value_type_t)type;
        if ((rc = parse_value(r, kv))) return rc;
        const int64_t dup = index_insert(g->kv_index, g->kv_cap, (int64_t)i, kv->key, kv_name_of, g);
        if (dup >= 0)
            return fl_fail(r->err, FL_EFORMAT, "%s: duplicate key '%s' (entries #%lld and #%llu)", r->name, kv->key,
                           (long long)dup, (unsigned long long)i);
    }
    return 0;
}

static int parse_tensor_infos(gguf_t *g, rd_t *r, uint64_t n_tensors)
{
    int rc;
    /* smallest info: u64 name length + 1 byte + u32 n_dims + i64 ne + u32 type + u64 offset */
    if (n_tensors > (r->size - r->pos) / 33)
        return fl_fail(r->err, FL_EFORMAT, "%s: header claims %llu tensors but the file (size %zu) cannot hold them", r->name,
                       (unsigned long long)n_tensors, r->size);
    g->tensors = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof *g->tensors);
    g->t_cap = index_cap((int64_t)n_tensors);
    g->t_index = calloc(g->t_cap, sizeof *g->t_index);
    if (!g->tensors || !g->t_index) return fl_fail(r->err, FL_ENOMEM, "%s: out of memory", r->name);
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        const uint8_t *s;
        uint64_t len, off;
        uint32_t type;
        char *name;
        if ((rc = rd_str(r, GGUF_MAX_NAME, &s, &len, "tensor name"))) return rc;
        if ((rc = copy_name(r, s, len, &name, "tensor", (int64_t)i))) return rc;
        t->name = name;
        g->n_tensors = (int64_t)i + 1;
        if ((rc = rd_u32(r, &t->n_dims, "tensor n_dims"))) return rc;
        if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
            return fl_fail(r->err, FL_EFORMAT, "%s: tensor '%s' has %u dimensions (must be 1..%d)", r->name, t->name, t->n_dims,
                           GGUF_MAX_DIMS);
        for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            uint64_t ne;
            if ((rc = rd_u64(r, &ne, "tensor dimension"))) return rc;
            if (ne > (uint64_t)INT64_MAX)
                return fl_fail(r->err, FL_EFORMAT, "%s: tensor '%s' has negative dimension ne[%u] = %lld", r->name, t->name, d,
                               (long long)ne);
            t->ne[d] = (int64_t)ne;
        }
        if ((rc = rd_u32(r, &type, "tensor type"))) return rc;
        if ((rc = rd_u64(r, &off, "tensor offset"))) return rc;
        t->type = (int)type;
        t->offset = off;
        if (type >= (uint32_t)N_GGML_TYPES)
            return fl_fail(r->err, FL_EFORMAT, "%s: tensor '%s' has unknown type %u", r->name, t->name, type);
        if (ggml_types[type].size == 0)
            return fl_fail(r->err, FL_EUNSUPPORTED, "%s: tensor '%s' has type %s (%u), which %s", r->name, t->name,
                           ggml_types[type].name, type,
                           type == FL_TYPE_Q8_1 ? "folio only uses for activations" : "ggml no longer defines");
        const int64_t blck = ggml_types[type].blck;
        if (t->ne[0] % blck)
            return fl_fail(r->err, FL_EFORMAT, "%s: tensor '%s' of type %s has ne[0] = %lld, not a multiple of the block size %lld",
                           r->name, t->name, ggml_types[type].name, (long long)t->ne[0], (long long)blck);
        int64_t nel = 1;
        uint64_t nbytes = (uint64_t)(t->ne[0] / blck) * (uint64_t)ggml_types[type].size;
        if ((uint64_t)(t->ne[0] / blck) > UINT64_MAX / (uint64_t)ggml_types[type].size) nbytes = UINT64_MAX, nel = -1;
        for (int d = 0; d < GGUF_MAX_DIMS && nel >= 0; d++) {
            if (__builtin_mul_overflow(nel, t->ne[d], &nel)) nel = -1;
            if (d > 0 && nel >= 0 && __builtin_mul_overflow(nbytes, (uint64_t)t->ne[d], &nbytes)) nel = -1;
        }
        if (nel < 0 || nbytes > SIZE_MAX)
            return fl_fail(r->err, FL_EFORMAT, "%s: tensor '%s' shape [%lld, %lld, %lld, %lld] overflows the element or byte count",
                           r->name, t->name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3]);
        t->nbytes = (size_t)nbytes;
        const int64_t dup = index_insert(g->t_index, g->t_cap, (int64_t)i, t->name, tensor_name_of, g);
        if (dup >= 0)
            return fl_fail(r->err, FL_EFORMAT, "%s: duplicate tensor name '%s' (tensors #%lld and #%llu)", r->name, t->name,
                           (long long)dup, (unsigned long long)i);
    }
    return 0;
}

static int64_t find_kv(const gguf_t *g, const char *key) { return index_find(g->kv_index, g->kv_cap, key, kv_name_of, g); }

static int parse(gguf_t *g, fl_error_t *err)
{
    rd_t r = {.p = g->base, .size = g->size, .pos = 0, .name = g->path, .err = err};
    const uint8_t *magic;
    uint32_t version;
    uint64_t n_tensors, n_kv;
    int rc;
    if (g->size < 4 || memcmp(g->base, GGUF_MAGIC, 4) != 0) {
        if (g->size < 4) return fl_fail(err, FL_EFORMAT, "%s: file too short for a GGUF header (%zu bytes)", g->path, g->size);
        return fl_fail(err, FL_EFORMAT, "%s: not a GGUF file (magic %02x %02x %02x %02x, expected \"GGUF\")", g->path,
                       g->base[0], g->base[1], g->base[2], g->base[3]);
    }
    if ((rc = rd_bytes(&r, 4, &magic, "magic"))) return rc;
    if ((rc = rd_u32(&r, &version, "version"))) return rc;
    if (version != 2 && version != 3) {
        if (version == 1) return fl_fail(err, FL_EUNSUPPORTED, "%s: GGUF version 1 is not supported (convert it with a newer llama.cpp)", g->path);
        if ((version & 0xffff) == 0 && (version >> 16))
            return fl_fail(err, FL_EUNSUPPORTED, "%s: big-endian GGUF (version field 0x%08x) is not supported", g->path, version);
        return fl_fail(err, FL_EUNSUPPORTED, "%s: unsupported GGUF version %u (supported: 2, 3)", g->path, version);
    }
    g->version = version;
    if ((rc = rd_u64(&r, &n_tensors, "tensor count"))) return rc;
    if ((rc = rd_u64(&r, &n_kv, "metadata key count"))) return rc;
    if ((rc = parse_kvs(g, &r, n_kv))) return rc;

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (find_kv(g, "general.alignment") >= 0) {
        uint32_t a;
        if ((rc = gguf_get_u32(g, "general.alignment", &a, err))) return rc;
        if (a == 0 || (a & (a - 1)))
            return fl_fail(err, FL_EFORMAT, "%s: general.alignment = %u is not a power of two", g->path, a);
        g->alignment = a;
    }
    if ((rc = parse_tensor_infos(g, &r, n_tensors))) return rc;

    if (r.pos > SIZE_MAX - (g->alignment - 1)) return fl_fail(err, FL_EFORMAT, "%s: data section offset overflows", g->path);
    g->data_offset = (r.pos + g->alignment - 1) / g->alignment * g->alignment;
    const size_t data_size = g->size > g->data_offset ? g->size - g->data_offset : 0;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        if (t->offset % g->alignment)
            return fl_fail(err, FL_EFORMAT, "%s: tensor '%s' offset %llu is not a multiple of the alignment %zu", g->path, t->name,
                           (unsigned long long)t->offset, g->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return fl_fail(err, FL_EFORMAT, "%s: tensor '%s' data [offset %llu, %zu bytes] runs past end of file (size %zu, data section at %zu)",
                           g->path, t->name, (unsigned long long)t->offset, t->nbytes, g->size,
                           g->data_offset);
        t->data = t->nbytes ? g->base + g->data_offset + t->offset : NULL;
    }
    return 0;
}

gguf_t *gguf_open_memory(const void *data, size_t size, const char *name, fl_error_t *err)
{
    gguf_t *g = calloc(1, sizeof *g);
    if (!g) {
        fl_fail(err, FL_ENOMEM, "%s: out of memory", name ? name : "gguf");
        return NULL;
    }
    g->path = strdup(name ? name : "<memory>");
    g->base = data;
    g->size = size;
    if (!g->path) {
        fl_fail(err, FL_ENOMEM, "%s: out of memory", name ? name : "gguf");
        gguf_destroy(&g);
        return NULL;
    }
    if (!data && size) {
        fl_fail(err, FL_EINVAL, "%s: NULL data", g->path);
        gguf_destroy(&g);
        return NULL;
    }
    if (parse(g, err)) gguf_destroy(&g);
    return g;
}

gguf_t *gguf_open(const char *path, fl_error_t *err)
{
    if (!path) {
        fl_fail(err, FL_EINVAL, "gguf_open: NULL path");
        return NULL;
    }
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fl_fail(err, FL_EIO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fl_fail(err, FL_EIO, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < 24) {
        fl_fail(err, FL_EFORMAT, "%s: file too short for a GGUF header (%lld bytes)", path, (long long)st.st_size);
        close(fd);
        return NULL;
    }
    const size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        fl_fail(err, FL_EIO, "%s: mmap of %zu bytes failed: %s", path, size, strerror(map_errno));
        return NULL;
    }
    gguf_t *g = gguf_open_memory(map, size, path, err);
    if (!g) {
        munmap(map, size);
        return NULL;
    }
    g->map = map;
    return g;
}

void gguf_destroy(gguf_t **gp)
{
    if (!gp || !*gp) return;
    gguf_t *g = *gp;
    for (int64_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_off);
    }
    free(g->kv);
    for (int64_t i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    free(g->tensors);
    free(g->kv_index);
    free(g->t_index);
    if (g->map) munmap(g->map, g->size);
    free(g->path);
    free(g);
    *gp = NULL;
}

const char *gguf_path(const gguf_t *g) { return g->path; }
uint32_t gguf_version(const gguf_t *g) { return g->version; }
size_t gguf_alignment(const gguf_t *g) { return g->alignment; }
size_t gguf_file_size(const gguf_t *g) { return g->size; }
size_t gguf_data_offset(const gguf_t *g) { return g->data_offset; }

/* ---- metadata ---- */

int64_t gguf_n_kv(const gguf_t *g) { return g->n_kv; }
int64_t gguf_find_key(const gguf_t *g, const char *key) { return index_find(g->kv_index, g->kv_cap, key, kv_name_of, g); }

const char *gguf_key_name(const gguf_t *g, int64_t i) { return i >= 0 && i < g->n_kv ? g->kv[i].key : NULL; }

gguf_value_type_t gguf_kv_type(const gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? g->kv[i].type : (gguf_value_type_t)-1;
}

static const kv_t *lookup(const gguf_t *g, const char *key, fl_error_t *err, int *rc)
{
    const int64_t i = gguf_find_key(g, key);
    if (i < 0) {
        *rc = fl_fail(err, FL_ENOTFOUND, "%s: key '%s' not found", g->path, key ? key : "(null)");
        return NULL;
    }
    *rc = 0;
    return &g->kv[i];
}

static int wrong_type(const gguf_t *g, const kv_t *kv, const char *want, fl_error_t *err)
{
    return fl_fail(err, FL_EFORMAT, "%s: key '%s' has type %s, expected %s", g->path, kv->key, gguf_type_name(kv->type), want);
}

/* Integer value as a 128-bit number; false when the value is not an integer. */
static bool kv_int(const kv_t *kv, __int128 *v)
{
    const uint8_t *b = kv->val;
    switch (kv->type) {
    case GGUF_TYPE_UINT8: *v = b[0]; return true;
    case GGUF_TYPE_INT8: *v = (int8_t)b[0]; return true;
    case GGUF_TYPE_UINT16: *v = (uint16_t)(b[0] | b[1] << 8); return true;
    case GGUF_TYPE_INT16: *v = (int16_t)(uint16_t)(b[0] | b[1] << 8); return true;
    case GGUF_TYPE_UINT32: *v = le32(b); return true;
    case GGUF_TYPE_INT32: *v = (int32_t)le32(b); return true;
    case GGUF_TYPE_UINT64: *v = le64(b); return true;
    case GGUF_TYPE_INT64: *v = (int64_t)le64(b); return true;
    default: return false;
    }
}

int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    __int128 v;
    if (!kv) return rc;
    if (!kv_int(kv, &v)) return wrong_type(g, kv, "an integer", err);
    if (v < 0 || v > UINT32_MAX)
        return fl_fail(err, FL_EFORMAT, "%s: key '%s' = %s%llu does not fit in uint32", g->path, kv->key, v < 0 ? "-" : "",
                       (unsigned long long)(v < 0 ? -v : v));
    *out = (uint32_t)v;
    return 0;
}

int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    __int128 v;
    if (!kv) return rc;
    if (!kv_int(kv, &v)) return wrong_type(g, kv, "an integer", err);
    if (v > INT64_MAX)
        return fl_fail(err, FL_EFORMAT, "%s: key '%s' = %llu does not fit in int64", g->path, kv->key, (unsigned long long)v);
    *out = (int64_t)v;
    return 0;
}

int gguf_get_f32(const gguf_t *g, const char *key, float *out, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    __int128 v;
    if (!kv) return rc;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        memcpy(out, kv->val, 4);
    } else if (kv->type == GGUF_TYPE_FLOAT64) {
        double d;
        memcpy(&d, kv->val, 8);
        *out = (float)d;
    } else if (kv_int(kv, &v)) {
        *out = (float)v;
    } else {
        return wrong_type(g, kv, "a number", err);
    }
    return 0;
}

int gguf_get_bool(const gguf_t *g, const char *key, bool *out, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_TYPE_BOOL) return wrong_type(g, kv, "bool", err);
    *out = kv->val[0] != 0;
    return 0;
}

int gguf_get_str(const gguf_t *g, const char *key, const char **s, size_t *len, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_TYPE_STRING) return wrong_type(g, kv, "string", err);
    *s = (const char *)kv->val;
    *len = (size_t)kv->len;
    return 0;
}

int gguf_get_arr(const gguf_t *g, const char *key, gguf_value_type_t *elem_type, uint64_t *n, fl_error_t *err)
{
    int rc;
    const kv_t *kv = lookup(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_TYPE_ARRAY) return wrong_type(g, kv, "array", err);
    if (elem_type) *elem_type = kv->elem_type;
    if (n) *n = kv->len;
    return 0;
}

const void *gguf_arr_data(const gguf_t *g, const char *key)
{
    const int64_t i = gguf_find_key(g, key);
    if (i < 0 || g->kv[i].type != GGUF_TYPE_ARRAY || g->kv[i].elem_type == GGUF_TYPE_STRING) return NULL;
    return g->kv[i].val;
}

int gguf_arr_str(const gguf_t *g, const char *key, uint64_t i, const char **s, size_t *len)
{
    const int64_t k = gguf_find_key(g, key);
    if (k < 0 || g->kv[k].type != GGUF_TYPE_ARRAY || g->kv[k].elem_type != GGUF_TYPE_STRING) return FL_ENOTFOUND;
    if (i >= g->kv[k].len) return FL_ERANGE;
    const uint64_t off = g->kv[k].str_off[i];
    *len = (size_t)le64(g->base + off);
    *s = (const char *)g->base + off + 8;
    return 0;
}

/* ---- tensors ---- */

int64_t gguf_n_tensors(const gguf_t *g) { return g->n_tensors; }

const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i) { return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL; }

const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name)
{
    const int64_t i = index_find(g->t_index, g->t_cap, name, tensor_name_of, g);
    return i >= 0 ? &g->tensors[i] : NULL;
}
