/* gguf_writer.c - GGUF v3 writer; see gguf_writer.h.
 *
 * Metadata is serialized as it is added into one growing byte buffer (key, type, value, exactly as
 * in the file), so writing it is a single fwrite. Tensors are kept as a list of (name, type, shape,
 * copied data or fill callback); their offsets are assigned at write time, each aligned. Keys and
 * tensor names are checked for duplicates on add (linear scans: files have tens of keys and at most
 * thousands of tensors, and a writer is not on any hot path). */
#include "gguf_writer.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"

#define WRITER_CHUNK_BYTES (8u << 20)

typedef struct {
    char *name;
    int type;
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset;
    void *data; /* copied bytes, or NULL when fill is set */
    gguf_writer_fill_fn fill;
    void *user;
} wtensor_t;

struct gguf_writer {
    uint8_t *meta; /* serialized key/value pairs */
    size_t meta_len, meta_cap;
    int64_t n_kv;
    char **keys;
    size_t keys_cap;
    wtensor_t *tensors;
    int64_t n_tensors;
    size_t tensors_cap;
    uint32_t alignment;
    int threads;    /* producers of generated tensors (gguf_writer_set_threads) */
    fl_error_t err; /* first failure, returned by write */
};

static int wfail(gguf_writer_t *w, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int wfail(gguf_writer_t *w, int code, const char *fmt, ...)
{
    if (w->err.code == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->err.msg, sizeof w->err.msg, fmt, ap);
        va_end(ap);
        w->err.code = code;
    }
    return code;
}

gguf_writer_t *gguf_writer_new(void)
{
    gguf_writer_t *w = calloc(1, sizeof *w);
    if (w) w->alignment = GGUF_DEFAULT_ALIGNMENT;
    return w;
}

void gguf_writer_destroy(gguf_writer_t **wp)
{
    if (!wp || !*wp) return;
    gguf_writer_t *w = *wp;
    free(w->meta);
    for (int64_t i = 0; i < w->n_kv; i++) free(w->keys[i]);
    free(w->keys);
    for (int64_t i = 0; i < w->n_tensors; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].data);
    }
    free(w->tensors);
    free(w);
    *wp = NULL;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need) {
        if (n > SIZE_MAX / 2 / elem) return FL_ENOMEM;
        n *= 2;
    }
    void *q = realloc(*p, n * elem);
    if (!q) return FL_ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

static int put(gguf_writer_t *w, const void *b, size_t n)
{
    if (n > SIZE_MAX - w->meta_len || grow((void **)&w->meta, &w->meta_cap, w->meta_len + n, 1))
        return wfail(w, FL_ENOMEM, "gguf_writer: out of memory for metadata");
    memcpy(w->meta + w->meta_len, b, n);
    w->meta_len += n;
    return 0;
}

static int put_u32(gguf_writer_t *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    return put(w, b, 4);
}

static int put_u64(gguf_writer_t *w, uint64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    return put(w, b, 8);
}

static int put_str(gguf_writer_t *w, const char *s, size_t len)
{
    int rc = put_u64(w, len);
    return rc ? rc : put(w, s, len);
}

/* Starts a pair: checks the key, records it, writes key and type. */
static int begin_kv(gguf_writer_t *w, const char *key, gguf_value_type_t type)
{
    if (!key || !*key) return wfail(w, FL_EINVAL, "gguf_writer: empty key");
    for (int64_t i = 0; i < w->n_kv; i++)
        if (strcmp(w->keys[i], key) == 0) return wfail(w, FL_EINVAL, "gguf_writer: duplicate key '%s'", key);
    char *copy = strdup(key);
    if (!copy || grow((void **)&w->keys, &w->keys_cap, (size_t)w->n_kv + 1, sizeof *w->keys)) {
        free(copy);
        return wfail(w, FL_ENOMEM, "gguf_writer: out of memory adding key '%s'", key);
    }
    w->keys[w->n_kv++] = copy;
    int rc = put_str(w, key, strlen(key));
    return rc ? rc : put_u32(w, (uint32_t)type);
}

static int set_scalar(gguf_writer_t *w, const char *key, gguf_value_type_t type, const void *v)
{
    int rc = begin_kv(w, key, type);
    return rc ? rc : put(w, v, gguf_type_size(type)); /* folio only runs on little-endian hosts */
}

int gguf_writer_set_u8(gguf_writer_t *w, const char *key, uint8_t v) { return set_scalar(w, key, GGUF_TYPE_UINT8, &v); }
int gguf_writer_set_i8(gguf_writer_t *w, const char *key, int8_t v) { return set_scalar(w, key, GGUF_TYPE_INT8, &v); }
int gguf_writer_set_u16(gguf_writer_t *w, const char *key, uint16_t v) { return set_scalar(w, key, GGUF_TYPE_UINT16, &v); }
int gguf_writer_set_i16(gguf_writer_t *w, const char *key, int16_t v) { return set_scalar(w, key, GGUF_TYPE_INT16, &v); }
int gguf_writer_set_u32(gguf_writer_t *w, const char *key, uint32_t v) { return set_scalar(w, key, GGUF_TYPE_UINT32, &v); }
int gguf_writer_set_i32(gguf_writer_t *w, const char *key, int32_t v) { return set_scalar(w, key, GGUF_TYPE_INT32, &v); }
int gguf_writer_set_u64(gguf_writer_t *w, const char *key, uint64_t v) { return set_scalar(w, key, GGUF_TYPE_UINT64, &v); }
int gguf_writer_set_i64(gguf_writer_t *w, const char *key, int64_t v) { return set_scalar(w, key, GGUF_TYPE_INT64, &v); }
int gguf_writer_set_f32(gguf_writer_t *w, const char *key, float v) { return set_scalar(w, key, GGUF_TYPE_FLOAT32, &v); }
int gguf_writer_set_f64(gguf_writer_t *w, const char *key, double v) { return set_scalar(w, key, GGUF_TYPE_FLOAT64, &v); }

int gguf_writer_set_bool(gguf_writer_t *w, const char *key, bool v)
{
    const uint8_t b = v ? 1 : 0;
    return set_scalar(w, key, GGUF_TYPE_BOOL, &b);
}

int gguf_writer_set_strn(gguf_writer_t *w, const char *key, const char *s, size_t len)
{
    if (!s && len) return wfail(w, FL_EINVAL, "gguf_writer: key '%s': NULL string", key ? key : "");
    int rc = begin_kv(w, key, GGUF_TYPE_STRING);
    return rc ? rc : put_str(w, s, len);
}

int gguf_writer_set_str(gguf_writer_t *w, const char *key, const char *s)
{
    return gguf_writer_set_strn(w, key, s ? s : "", s ? strlen(s) : 0);
}

int gguf_writer_set_arr(gguf_writer_t *w, const char *key, gguf_value_type_t elem_type, const void *data, uint64_t n)
{
    const size_t ez = gguf_type_size(elem_type);
    if (ez == 0)
        return wfail(w, FL_EINVAL, "gguf_writer: key '%s': arrays of %s need gguf_writer_set_arr_str or are unsupported",
                     key ? key : "", gguf_type_name(elem_type));
    if (n > SIZE_MAX / ez || (!data && n)) return wfail(w, FL_EINVAL, "gguf_writer: key '%s': bad array", key ? key : "");
    int rc = begin_kv(w, key, GGUF_TYPE_ARRAY);
    if (!rc) rc = put_u32(w, (uint32_t)elem_type);
    if (!rc) rc = put_u64(w, n);
    if (!rc && n) rc = put(w, data, (size_t)n * ez);
    return rc;
}

int gguf_writer_set_arr_str(gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n)
{
    if (!strs && n) return wfail(w, FL_EINVAL, "gguf_writer: key '%s': NULL string array", key ? key : "");
    int rc = begin_kv(w, key, GGUF_TYPE_ARRAY);
    if (!rc) rc = put_u32(w, GGUF_TYPE_STRING);
    if (!rc) rc = put_u64(w, n);
    for (uint64_t i = 0; i < n && !rc; i++) rc = put_str(w, strs[i] ? strs[i] : "", strs[i] ? strlen(strs[i]) : 0);
    return rc;
}

int gguf_writer_set_alignment(gguf_writer_t *w, uint32_t alignment)
{
    if (alignment == 0 || (alignment & (alignment - 1)))
        return wfail(w, FL_EINVAL, "gguf_writer: alignment %u is not a power of two", alignment);
    int rc = gguf_writer_set_u32(w, "general.alignment", alignment);
    if (!rc) w->alignment = alignment;
    return rc;
}

static int add_tensor(gguf_writer_t *w, const char *name, int type, int n_dims, const int64_t *ne, const void *data,
                      gguf_writer_fill_fn fill, void *user)
{
    if (!name || !*name) return wfail(w, FL_EINVAL, "gguf_writer: empty tensor name");
    if (!fl_dtype_supported(type))
        return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': type %d cannot be written", name, type);
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS || !ne)
        return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': %d dimensions (must be 1..%d)", name, n_dims, GGUF_MAX_DIMS);
    if (!data && !fill) return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': no data", name);
    for (int64_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0) return wfail(w, FL_EINVAL, "gguf_writer: duplicate tensor '%s'", name);
    wtensor_t t = {.type = type, .n_dims = n_dims, .fill = fill, .user = user, .ne = {1, 1, 1, 1}};
    uint64_t rows = 1;
    for (int d = 0; d < n_dims; d++) {
        if (ne[d] < 0) return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': negative ne[%d]", name, d);
        t.ne[d] = ne[d];
        if (d > 0 && __builtin_mul_overflow(rows, (uint64_t)ne[d], &rows))
            return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': shape overflows", name);
    }
    const size_t row = fl_dtype_row_bytes(type, ne[0]);
    if (row == 0 && ne[0] != 0)
        return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': ne[0] = %lld is not a multiple of the %s block size", name,
                     (long long)ne[0], fl_dtype_name(type));
    if (__builtin_mul_overflow((uint64_t)row, rows, &t.nbytes) || t.nbytes > SIZE_MAX / 2)
        return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': size overflows", name);
    if (grow((void **)&w->tensors, &w->tensors_cap, (size_t)w->n_tensors + 1, sizeof *w->tensors))
        return wfail(w, FL_ENOMEM, "gguf_writer: out of memory adding tensor '%s'", name);
    t.name = strdup(name);
    if (!t.name) return wfail(w, FL_ENOMEM, "gguf_writer: out of memory adding tensor '%s'", name);
    if (data) {
        t.data = malloc(t.nbytes ? (size_t)t.nbytes : 1);
        if (!t.data) {
            free(t.name);
            return wfail(w, FL_ENOMEM, "gguf_writer: out of memory copying tensor '%s' (%llu bytes)", name,
                         (unsigned long long)t.nbytes);
        }
        memcpy(t.data, data, (size_t)t.nbytes);
    }
    w->tensors[w->n_tensors++] = t;
    return 0;
}

int gguf_writer_add_tensor(gguf_writer_t *w, const char *name, int type, int n_dims, const int64_t *ne, const void *data)
{
    if (!data) return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': NULL data", name ? name : "");
    return add_tensor(w, name, type, n_dims, ne, data, NULL, NULL);
}

int gguf_writer_add_tensor_fn(gguf_writer_t *w, const char *name, int type, int n_dims, const int64_t *ne,
                              gguf_writer_fill_fn fill, void *user)
{
    if (!fill) return wfail(w, FL_EINVAL, "gguf_writer: tensor '%s': NULL fill callback", name ? name : "");
    return add_tensor(w, name, type, n_dims, ne, NULL, fill, user);
}

int64_t gguf_writer_n_tensors(const gguf_writer_t *w) { return w->n_tensors; }

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Assigns offsets; returns the header size (start of the data section) and the data size. */
static uint64_t layout(gguf_writer_t *w, uint64_t *data_size)
{
    uint64_t hdr = 4 + 4 + 8 + 8 + w->meta_len;
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n_tensors; i++) {
        wtensor_t *t = &w->tensors[i];
        hdr += 8 + strlen(t->name) + 4 + 8 * (uint64_t)t->n_dims + 4 + 8;
        t->offset = off;
        off = align_up(off + t->nbytes, w->alignment);
    }
    *data_size = off;
    return align_up(hdr, w->alignment);
}

uint64_t gguf_writer_file_size(const gguf_writer_t *w)
{
    uint64_t data;
    const uint64_t hdr = layout((gguf_writer_t *)w, &data);
    return hdr + data;
}

static int write_all(FILE *f, const void *b, size_t n) { return n == 0 || fwrite(b, 1, n, f) == n ? 0 : -1; }

static int write_le(FILE *f, uint64_t v, int bytes)
{
    uint8_t b[8];
    for (int i = 0; i < bytes; i++) b[i] = (uint8_t)(v >> (8 * i));
    return write_all(f, b, (size_t)bytes);
}

static int write_pad(FILE *f, uint64_t pos, uint64_t align)
{
    static const uint8_t zeros[4096];
    uint64_t n = align_up(pos, align) - pos;
    while (n) {
        const size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        if (write_all(f, zeros, k)) return -1;
        n -= k;
    }
    return 0;
}

/* The data section, on w->threads threads (the caller's alone by default): each takes the next
 * tensor, produces it in chunks (its rows in order, on that one thread) and writes them at their
 * offsets with pwrite. Alignment padding is left as holes, which read as zeros; the file is then
 * sized to its end. */
typedef struct {
    gguf_writer_t *w;
    int fd;
    uint64_t hdr;
    const char *path;
    atomic_long next;
    pthread_mutex_t lock;
    int rc;
    fl_error_t err;
} par_write_t;

static int par_fail(par_write_t *pw, int rc, const fl_error_t *e)
{
    pthread_mutex_lock(&pw->lock);
    if (!pw->rc) pw->rc = rc, pw->err = *e;
    pthread_mutex_unlock(&pw->lock);
    return rc;
}

static void *par_write_run(void *arg)
{
    par_write_t *pw = arg;
    void *chunk = NULL;
    size_t chunk_cap = 0;
    for (;;) {
        const long i = atomic_fetch_add(&pw->next, 1);
        if (i >= pw->w->n_tensors || __atomic_load_n(&pw->rc, __ATOMIC_RELAXED)) break;
        const wtensor_t *t = &pw->w->tensors[i];
        fl_error_t e = {0};
        uint64_t off = pw->hdr + t->offset;
        if (t->data) {
            if (pwrite(pw->fd, t->data, (size_t)t->nbytes, (off_t)off) != (ssize_t)t->nbytes)
                par_fail(pw, fl_fail(&e, FL_EIO, "%s: write failed: %s", pw->path, strerror(errno)), &e);
            continue;
        }
        if (!t->nbytes) continue;
        const size_t row = fl_dtype_row_bytes(t->type, t->ne[0]);
        const int64_t rows = (int64_t)(t->nbytes / row);
        int64_t per = (int64_t)(WRITER_CHUNK_BYTES / row);
        if (per < 1) per = 1;
        if (per > rows) per = rows;
        if ((size_t)per * row > chunk_cap) {
            free(chunk);
            chunk_cap = (size_t)per * row;
            if (!(chunk = malloc(chunk_cap))) {
                chunk_cap = 0;
                par_fail(pw, fl_fail(&e, FL_ENOMEM, "%s: out of memory for a write buffer", pw->path), &e);
                break;
            }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += per) {
            const int64_t n = rows - r0 < per ? rows - r0 : per;
            const int rc = t->fill(t->user, r0, n, chunk, &e);
            if (rc) {
                if (e.code == 0) fl_fail(&e, rc, "%s: generating tensor '%s' failed", pw->path, t->name);
                par_fail(pw, rc, &e);
                break;
            }
            const size_t len = (size_t)n * row;
            if (pwrite(pw->fd, chunk, len, (off_t)off) != (ssize_t)len) {
                par_fail(pw, fl_fail(&e, FL_EIO, "%s: write failed: %s", pw->path, strerror(errno)), &e);
                break;
            }
            off += len;
        }
    }
    free(chunk);
    return NULL;
}

static int write_data(gguf_writer_t *w, FILE *f, uint64_t hdr, uint64_t data_size, const char *path, fl_error_t *err)
{
    if (fflush(f) != 0) return fl_fail(err, FL_EIO, "%s: write failed: %s", path, strerror(errno));
    par_write_t pw = {.w = w, .fd = fileno(f), .hdr = hdr, .path = path};
    atomic_init(&pw.next, 0);
    pthread_mutex_init(&pw.lock, NULL);
    enum { MAX_THREADS = 64 };
    pthread_t tids[MAX_THREADS];
    int n = w->threads < MAX_THREADS ? w->threads : MAX_THREADS, started = 0;
    for (int k = 1; k < n; k++)
        if (pthread_create(&tids[started], NULL, par_write_run, &pw) == 0) started++;
    par_write_run(&pw);
    for (int k = 0; k < started; k++) pthread_join(tids[k], NULL);
    pthread_mutex_destroy(&pw.lock);
    if (pw.rc) {
        if (err) *err = pw.err;
        return pw.rc;
    }
    if (ftruncate(pw.fd, (off_t)(hdr + data_size)) != 0)
        return fl_fail(err, FL_EIO, "%s: sizing failed: %s", path, strerror(errno));
    return 0;
}

static int write_file(gguf_writer_t *w, FILE *f, const char *path, fl_error_t *err)
{
    uint64_t data_size;
    const uint64_t hdr = layout(w, &data_size);
    uint64_t pos = 0;
    int io = write_all(f, "GGUF", 4) | write_le(f, 3, 4) | write_le(f, (uint64_t)w->n_tensors, 8) |
             write_le(f, (uint64_t)w->n_kv, 8) | write_all(f, w->meta, w->meta_len);
    pos = 24 + w->meta_len;
    for (int64_t i = 0; i < w->n_tensors && !io; i++) {
        const wtensor_t *t = &w->tensors[i];
        const size_t len = strlen(t->name);
        io |= write_le(f, len, 8) | write_all(f, t->name, len) | write_le(f, (uint64_t)t->n_dims, 4);
        for (int d = 0; d < t->n_dims; d++) io |= write_le(f, (uint64_t)t->ne[d], 8);
        io |= write_le(f, (uint64_t)t->type, 4) | write_le(f, t->offset, 8);
        pos += 8 + len + 4 + 8 * (uint64_t)t->n_dims + 12;
    }
    io |= write_pad(f, pos, w->alignment);
    if (io) return fl_fail(err, FL_EIO, "%s: write failed: %s", path, strerror(errno));
    return write_data(w, f, hdr, data_size, path, err);
}

void gguf_writer_set_threads(gguf_writer_t *w, int n) { w->threads = n; }

int gguf_writer_write(gguf_writer_t *w, const char *path, fl_error_t *err)
{
    if (w->err.code) return fl_fail(err, w->err.code, "%s: %s", path ? path : "gguf_writer", w->err.msg);
    if (!path) return fl_fail(err, FL_EINVAL, "gguf_writer: NULL path");
    const size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return fl_fail(err, FL_ENOMEM, "%s: out of memory", path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        int rc = fl_fail(err, FL_EIO, "%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    int rc = write_file(w, f, path, err);
    if (fflush(f) != 0 && !rc) rc = fl_fail(err, FL_EIO, "%s: write failed: %s", path, strerror(errno));
    if (fclose(f) != 0 && !rc) rc = fl_fail(err, FL_EIO, "%s: close failed: %s", path, strerror(errno));
    if (!rc && rename(tmp, path) != 0) rc = fl_fail(err, FL_EIO, "%s: rename from %s failed: %s", path, tmp, strerror(errno));
    if (rc) unlink(tmp);
    free(tmp);
    return rc;
}
