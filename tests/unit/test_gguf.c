/* test_gguf.c - GGUF reader, writer, reference quantizers and the model generator.
 *
 * Round trips go writer -> file -> reader. Corrupt files are built byte by byte with gb_* below
 * (one per corruption class) and must fail with an error that says what is wrong; every prefix of a
 * valid file must fail or open without touching memory it should not (run under ASan in CI). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "gguf.h"
#include "gguf_writer.h"
#include "mkmodel.h"
#include "quant.h"
#include "test_util.h"

static char tmpdir[256];

static int setup_tmpdir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/folio_test_gguf_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_tmpdir(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *tmp_path(const char *name)
{
    static char buf[4][400];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

/* ---- raw GGUF builder for corrupt files ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} gb_t;

static void gb_put(gb_t *b, const void *d, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void gb_u32(gb_t *b, uint32_t v) { gb_put(b, &v, 4); }
static void gb_u64(gb_t *b, uint64_t v) { gb_put(b, &v, 8); }
static void gb_str(gb_t *b, const char *s)
{
    gb_u64(b, strlen(s));
    gb_put(b, s, strlen(s));
}
static void gb_header(gb_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    gb_put(b, "GGUF", 4);
    gb_u32(b, version);
    gb_u64(b, n_tensors);
    gb_u64(b, n_kv);
}
static void gb_kv_u32(gb_t *b, const char *key, uint32_t v)
{
    gb_str(b, key);
    gb_u32(b, GGUF_TYPE_UINT32);
    gb_u32(b, v);
}
static void gb_tensor(gb_t *b, const char *name, uint32_t n_dims, const int64_t *ne, uint32_t type, uint64_t offset)
{
    gb_str(b, name);
    gb_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++) gb_u64(b, (uint64_t)ne[i]);
    gb_u32(b, type);
    gb_u64(b, offset);
}
static void gb_pad(gb_t *b, size_t align)
{
    static const uint8_t z[64];
    while (b->n % align) gb_put(b, z, 1);
}
static void gb_zeros(gb_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++) gb_put(b, "", 1);
}

/* Opens b from memory, expects failure with `code` and a message containing `needle`. */
static void expect_fail(gb_t *b, int code, const char *needle)
{
    fl_error_t err = {0};
    gguf_t *g = gguf_open_memory(b->p, b->n, "bad.gguf", &err);
    if (g) gguf_destroy(&g);
    assert_null(g);
    if (!strstr(err.msg, needle) || strncmp(err.msg, "bad.gguf: ", 10) != 0) fail_msg("message '%s' lacks '%s'", err.msg, needle);
    if (code) assert_int_equal(err.code, code);
    free(b->p);
    *b = (gb_t){0};
}

static gguf_t *open_ok(gb_t *b)
{
    fl_error_t err = {0};
    gguf_t *g = gguf_open_memory(b->p, b->n, "ok.gguf", &err);
    if (!g) fail_msg("unexpected error: %s", err.msg);
    return g;
}

/* ---- writer -> reader round trip ---- */

static int fill_counter(void *user, int64_t row0, int64_t n_rows, void *dst, fl_error_t *err)
{
    (void)err;
    const int64_t ne0 = *(const int64_t *)user;
    float *f = dst;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < ne0; i++) f[r * ne0 + i] = (float)((row0 + r) * 1000 + i);
    return 0;
}

static void test_roundtrip_every_metadata_and_tensor_type(void **state)
{
    (void)state;
    gguf_writer_t *w = gguf_writer_new();
    assert_non_null(w);
    assert_int_equal(gguf_writer_set_u8(w, "t.u8", 200), 0);
    gguf_writer_set_i8(w, "t.i8", -100);
    gguf_writer_set_u16(w, "t.u16", 60000);
    gguf_writer_set_i16(w, "t.i16", -30000);
    gguf_writer_set_u32(w, "t.u32", 4000000000u);
    gguf_writer_set_i32(w, "t.i32", -2000000000);
    gguf_writer_set_u64(w, "t.u64", 10000000000000000000ull);
    gguf_writer_set_i64(w, "t.i64", -9000000000000000000ll);
    gguf_writer_set_f32(w, "t.f32", 1.5f);
    gguf_writer_set_f64(w, "t.f64", 2.25);
    gguf_writer_set_bool(w, "t.bool", true);
    gguf_writer_set_str(w, "t.str", "hello");
    gguf_writer_set_str(w, "t.empty", "");
    const int32_t ai[3] = {1, -2, 3};
    const float af[2] = {0.5f, -0.25f};
    const uint8_t ab[3] = {1, 0, 1};
    const uint64_t au[2] = {1, UINT64_MAX};
    const char *as[4] = {"a", "", "ccc", "Ġthe"};
    gguf_writer_set_arr(w, "t.arr_i32", GGUF_TYPE_INT32, ai, 3);
    gguf_writer_set_arr(w, "t.arr_f32", GGUF_TYPE_FLOAT32, af, 2);
    gguf_writer_set_arr(w, "t.arr_bool", GGUF_TYPE_BOOL, ab, 3);
    gguf_writer_set_arr(w, "t.arr_u64", GGUF_TYPE_UINT64, au, 2);
    gguf_writer_set_arr(w, "t.arr_empty", GGUF_TYPE_UINT8, NULL, 0);
    gguf_writer_set_arr_str(w, "t.arr_str", as, 4);

    /* one tensor of each weight type, 64 x 3 elements, from the same floats */
    const int types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
    float src[192];
    for (int i = 0; i < 192; i++) src[i] = sinf((float)i * 0.37f);
    uint8_t enc[6][192 * 4];
    size_t enc_n[6];
    for (int t = 0; t < 6; t++) {
        char name[32];
        snprintf(name, sizeof name, "w.%s", fl_dtype_name(types[t]));
        enc_n[t] = 0;
        for (int r = 0; r < 3; r++) enc_n[t] += quant_quantize_row(types[t], src + 64 * r, enc[t] + enc_n[t], 64);
        const int64_t ne[2] = {64, 3};
        assert_int_equal(gguf_writer_add_tensor(w, name, types[t], 2, ne, enc[t]), 0);
    }
    const int64_t ne4[4] = {32, 2, 3, 2};
    float big[32 * 12];
    for (int i = 0; i < 32 * 12; i++) big[i] = (float)i;
    gguf_writer_add_tensor(w, "w.4d", FL_TYPE_F32, 4, ne4, big);
    int64_t ne0 = 5;
    const int64_t ne_fn[2] = {5, 7};
    assert_int_equal(gguf_writer_add_tensor_fn(w, "w.streamed", FL_TYPE_F32, 2, ne_fn, fill_counter, &ne0), 0);
    const uint64_t expect_size = gguf_writer_file_size(w);
    fl_error_t err = {0};
    const char *path = tmp_path("rt.gguf");
    assert_int_equal(gguf_writer_write(w, path, &err), 0);
    gguf_writer_destroy(&w);
    assert_null(w);

    gguf_t *g = gguf_open(path, &err);
    if (!g) fail_msg("%s", err.msg);
    assert_int_equal(gguf_file_size(g), expect_size);
    assert_int_equal(gguf_version(g), 3);
    assert_int_equal(gguf_alignment(g), 32);
    assert_int_equal(gguf_data_offset(g) % 32, 0);
    assert_int_equal(gguf_n_kv(g), 19);
    assert_string_equal(gguf_key_name(g, 0), "t.u8");
    assert_int_equal(gguf_kv_type(g, 0), GGUF_TYPE_UINT8);
    assert_null(gguf_key_name(g, 19));
    assert_int_equal(gguf_find_key(g, "nope"), -1);

    uint32_t u32;
    int64_t i64;
    float f;
    bool b;
    const char *s;
    size_t len;
    assert_int_equal(gguf_get_u32(g, "t.u8", &u32, &err), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(gguf_get_i64(g, "t.i8", &i64, &err), 0);
    assert_int_equal(i64, -100);
    assert_int_equal(gguf_get_u32(g, "t.u16", &u32, &err), 0);
    assert_int_equal(u32, 60000);
    assert_int_equal(gguf_get_i64(g, "t.i16", &i64, &err), 0);
    assert_int_equal(i64, -30000);
    assert_int_equal(gguf_get_u32(g, "t.u32", &u32, &err), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i64(g, "t.i32", &i64, &err), 0);
    assert_int_equal(i64, -2000000000);
    assert_int_equal(gguf_get_i64(g, "t.i64", &i64, &err), 0);
    assert_true(i64 == -9000000000000000000ll);
    assert_int_equal(gguf_get_f32(g, "t.f32", &f, &err), 0);
    assert_true(f == 1.5f);
    assert_int_equal(gguf_get_f32(g, "t.f64", &f, &err), 0);
    assert_true(f == 2.25f);
    assert_int_equal(gguf_get_f32(g, "t.i16", &f, &err), 0);
    assert_true(f == -30000.0f);
    assert_int_equal(gguf_get_bool(g, "t.bool", &b, &err), 0);
    assert_true(b);
    assert_int_equal(gguf_get_str(g, "t.str", &s, &len, &err), 0);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "hello", 5);
    assert_int_equal(gguf_get_str(g, "t.empty", &s, &len, &err), 0);
    assert_int_equal(len, 0);

    /* type mismatches and range checks name the key */
    assert_int_equal(gguf_get_u32(g, "t.i32", &u32, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "'t.i32'"));
    assert_int_equal(gguf_get_i64(g, "t.u64", &i64, &err), FL_EFORMAT);
    assert_int_equal(gguf_get_u32(g, "t.str", &u32, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "'t.str' has type string"));
    assert_int_equal(gguf_get_str(g, "t.u32", &s, &len, &err), FL_EFORMAT);
    assert_int_equal(gguf_get_bool(g, "t.u8", &b, &err), FL_EFORMAT);
    assert_int_equal(gguf_get_f32(g, "t.str", &f, &err), FL_EFORMAT);
    assert_int_equal(gguf_get_u32(g, "missing", &u32, &err), FL_ENOTFOUND);
    assert_int_equal(gguf_get_arr(g, "t.str", NULL, NULL, &err), FL_EFORMAT);

    gguf_value_type_t et;
    uint64_t n;
    assert_int_equal(gguf_get_arr(g, "t.arr_i32", &et, &n, &err), 0);
    assert_int_equal(et, GGUF_TYPE_INT32);
    assert_int_equal(n, 3);
    int32_t gi[3];
    memcpy(gi, gguf_arr_data(g, "t.arr_i32"), sizeof gi);
    assert_memory_equal(gi, ai, sizeof ai);
    float gf[2];
    memcpy(gf, gguf_arr_data(g, "t.arr_f32"), sizeof gf);
    assert_memory_equal(gf, af, sizeof af);
    assert_memory_equal(gguf_arr_data(g, "t.arr_bool"), ab, 3);
    uint64_t gu[2];
    memcpy(gu, gguf_arr_data(g, "t.arr_u64"), sizeof gu);
    assert_memory_equal(gu, au, sizeof au);
    assert_int_equal(gguf_get_arr(g, "t.arr_empty", &et, &n, &err), 0);
    assert_int_equal(n, 0);
    assert_int_equal(gguf_get_arr(g, "t.arr_str", &et, &n, &err), 0);
    assert_int_equal(et, GGUF_TYPE_STRING);
    assert_int_equal(n, 4);
    assert_null(gguf_arr_data(g, "t.arr_str"));
    for (int i = 0; i < 4; i++) {
        assert_int_equal(gguf_arr_str(g, "t.arr_str", (uint64_t)i, &s, &len), 0);
        assert_int_equal(len, strlen(as[i]));
        assert_memory_equal(s, as[i], len);
    }
    assert_int_equal(gguf_arr_str(g, "t.arr_str", 4, &s, &len), FL_ERANGE);
    assert_int_equal(gguf_arr_str(g, "t.arr_i32", 0, &s, &len), FL_ENOTFOUND);
    assert_int_equal(gguf_arr_str(g, "nope", 0, &s, &len), FL_ENOTFOUND);

    assert_int_equal(gguf_n_tensors(g), 8);
    for (int t = 0; t < 6; t++) {
        char name[32];
        snprintf(name, sizeof name, "w.%s", fl_dtype_name(types[t]));
        const gguf_tensor_t *ti = gguf_find_tensor(g, name);
        assert_non_null(ti);
        assert_ptr_equal(ti, gguf_tensor(g, t));
        assert_int_equal(ti->type, types[t]);
        assert_int_equal(ti->n_dims, 2);
        assert_int_equal(ti->ne[0], 64);
        assert_int_equal(ti->ne[1], 3);
        assert_int_equal(ti->ne[2], 1);
        assert_int_equal(ti->nbytes, enc_n[t]);
        assert_int_equal(ti->offset % 32, 0);
        assert_memory_equal(ti->data, enc[t], enc_n[t]);
    }
    const gguf_tensor_t *t4 = gguf_find_tensor(g, "w.4d");
    assert_int_equal(t4->n_dims, 4);
    assert_int_equal(t4->ne[3], 2);
    assert_memory_equal(t4->data, big, sizeof big);
    const gguf_tensor_t *ts = gguf_find_tensor(g, "w.streamed");
    assert_int_equal(ts->nbytes, 5 * 7 * 4);
    float v;
    memcpy(&v, (const float *)ts->data + 6 * 5 + 4, 4);
    assert_true(v == 6004.0f);
    assert_null(gguf_find_tensor(g, "w.none"));
    assert_null(gguf_tensor(g, 8));
    assert_null(gguf_tensor(g, -1));
    gguf_destroy(&g);
    assert_null(g);
    gguf_destroy(&g); /* NULL is fine */
}

static void test_writer_custom_alignment_is_honoured(void **state)
{
    (void)state;
    gguf_writer_t *w = gguf_writer_new();
    assert_int_equal(gguf_writer_set_alignment(w, 256), 0);
    const int64_t ne[1] = {3};
    const float a[3] = {1, 2, 3};
    gguf_writer_add_tensor(w, "a", FL_TYPE_F32, 1, ne, a);
    gguf_writer_add_tensor(w, "b", FL_TYPE_F32, 1, ne, a);
    fl_error_t err = {0};
    assert_int_equal(gguf_writer_write(w, tmp_path("al.gguf"), &err), 0);
    gguf_writer_destroy(&w);
    gguf_t *g = gguf_open(tmp_path("al.gguf"), &err);
    assert_non_null(g);
    assert_int_equal(gguf_alignment(g), 256);
    assert_int_equal(gguf_data_offset(g) % 256, 0);
    assert_int_equal(gguf_find_tensor(g, "b")->offset, 256);
    gguf_destroy(&g);
}

static void test_writer_reports_first_error_at_write(void **state)
{
    (void)state;
    gguf_writer_t *w = gguf_writer_new();
    fl_error_t err = {0};
    assert_int_equal(gguf_writer_set_u32(w, "k", 1), 0);
    assert_int_equal(gguf_writer_set_u32(w, "k", 2), FL_EINVAL);
    const int64_t ne[1] = {33};
    const float a[33] = {0};
    assert_int_equal(gguf_writer_add_tensor(w, "q", FL_TYPE_Q4_0, 1, ne, a), FL_EINVAL);
    assert_int_equal(gguf_writer_write(w, tmp_path("never.gguf"), &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "duplicate key 'k'"));
    assert_int_equal(access(tmp_path("never.gguf"), F_OK), -1);
    gguf_writer_destroy(&w);

    w = gguf_writer_new();
    gguf_writer_add_tensor(w, "t", FL_TYPE_F32, 1, ne, a);
    gguf_writer_add_tensor(w, "t", FL_TYPE_F32, 1, ne, a);
    assert_int_equal(gguf_writer_write(w, tmp_path("never.gguf"), &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "duplicate tensor 't'"));
    gguf_writer_destroy(&w);

    w = gguf_writer_new();
    assert_int_equal(gguf_writer_write(w, "/nonexistent-dir/x.gguf", &err), FL_EIO);
    gguf_writer_destroy(&w);
}

/* ---- corruption classes ---- */

static void test_open_missing_file_and_short_file(void **state)
{
    (void)state;
    fl_error_t err = {0};
    assert_null(gguf_open(tmp_path("does-not-exist.gguf"), &err));
    assert_int_equal(err.code, FL_EIO);
    assert_non_null(strstr(err.msg, "does-not-exist.gguf: cannot open"));
    FILE *f = fopen(tmp_path("short.gguf"), "wb");
    fwrite("GGUF\3\0\0\0\0\0", 1, 10, f);
    fclose(f);
    assert_null(gguf_open(tmp_path("short.gguf"), &err));
    assert_int_equal(err.code, FL_EFORMAT);
    assert_non_null(strstr(err.msg, "too short"));
    assert_null(gguf_open(tmpdir, &err)); /* a directory */
}

static void test_truncated_header_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_put(&b, "GGUF", 4);
    gb_u32(&b, 3);
    gb_u64(&b, 0);
    expect_fail(&b, FL_EFORMAT, "truncated");
    gb_put(&b, "GG", 2);
    expect_fail(&b, FL_EFORMAT, "too short");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "general.name");
    gb_u32(&b, GGUF_TYPE_STRING);
    expect_fail(&b, FL_EFORMAT, "truncated: string value at offset 48");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "general.name");
    gb_u32(&b, GGUF_TYPE_UINT64);
    gb_u32(&b, 7); /* 4 of the 8 value bytes */
    expect_fail(&b, FL_EFORMAT, "truncated");
}

static void test_bad_magic_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_put(&b, "GGML", 4);
    gb_u32(&b, 3);
    gb_u64(&b, 0);
    gb_u64(&b, 0);
    expect_fail(&b, FL_EFORMAT, "not a GGUF file");
}

static void test_bad_version_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_header(&b, 1, 0, 0);
    expect_fail(&b, FL_EUNSUPPORTED, "version 1");
    gb_header(&b, 4, 0, 0);
    expect_fail(&b, FL_EUNSUPPORTED, "unsupported GGUF version 4");
    gb_header(&b, 0x03000000u, 0, 0);
    expect_fail(&b, FL_EUNSUPPORTED, "big-endian");
    gb_header(&b, 2, 0, 0); /* v2 is fine */
    gguf_t *g = open_ok(&b);
    assert_int_equal(gguf_version(g), 2);
    gguf_destroy(&g);
    free(b.p);
}

static void test_huge_counts_fail_before_allocating(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_header(&b, 3, UINT64_MAX, 0);
    expect_fail(&b, FL_EFORMAT, "tensors but the file");
    gb_header(&b, 3, 0, UINT64_MAX / 2);
    expect_fail(&b, FL_EFORMAT, "metadata keys but the file");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "arr");
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u32(&b, GGUF_TYPE_UINT64);
    gb_u64(&b, UINT64_MAX / 4); /* count * 8 overflows */
    expect_fail(&b, FL_EFORMAT, "key 'arr' claims");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "arr");
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u32(&b, GGUF_TYPE_STRING);
    gb_u64(&b, 1ull << 40);
    expect_fail(&b, FL_EFORMAT, "key 'arr' claims");
}

static void test_string_length_past_end_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "general.name");
    gb_u32(&b, GGUF_TYPE_STRING);
    gb_u64(&b, 1000);
    gb_put(&b, "abc", 3);
    expect_fail(&b, FL_EFORMAT, "past the end");
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, UINT64_MAX); /* key length */
    gb_zeros(&b, 16);
    expect_fail(&b, FL_EFORMAT, "key name");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "tokens");
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u32(&b, GGUF_TYPE_STRING);
    gb_u64(&b, 2);
    gb_str(&b, "ok");
    gb_u64(&b, 99);
    gb_zeros(&b, 8);
    expect_fail(&b, FL_EFORMAT, "element 1 of key 'tokens'");
}

static void test_unknown_value_type_names_key(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "my.key");
    gb_u32(&b, 13);
    gb_u64(&b, 0);
    expect_fail(&b, FL_EFORMAT, "key 'my.key' has unknown value type 13");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "my.arr");
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u32(&b, 99);
    gb_u64(&b, 1);
    gb_zeros(&b, 8);
    expect_fail(&b, FL_EFORMAT, "key 'my.arr' is an array of unknown value type 99");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "nested");
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u32(&b, GGUF_TYPE_ARRAY);
    gb_u64(&b, 0);
    expect_fail(&b, FL_EUNSUPPORTED, "key 'nested' is a nested array");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "flag");
    gb_u32(&b, GGUF_TYPE_BOOL);
    gb_put(&b, "\2", 1);
    gb_zeros(&b, 16);
    expect_fail(&b, FL_EFORMAT, "key 'flag' has bool value 2");
}

static void test_bad_alignment_fails(void **state)
{
    (void)state;
    const uint32_t bad[] = {0, 3, 48};
    for (int i = 0; i < 3; i++) {
        gb_t b = {0};
        gb_header(&b, 3, 0, 1);
        gb_kv_u32(&b, "general.alignment", bad[i]);
        expect_fail(&b, FL_EFORMAT, "is not a power of two");
    }
    gb_t b = {0};
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "general.alignment");
    gb_u32(&b, GGUF_TYPE_STRING);
    gb_str(&b, "32");
    expect_fail(&b, FL_EFORMAT, "'general.alignment' has type string");
    /* a tensor offset that is not a multiple of the alignment */
    const int64_t ne[1] = {4};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "t", 1, ne, FL_TYPE_F32, 16);
    gb_pad(&b, 32);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "tensor 't' offset 16 is not a multiple of the alignment 32");
}

static void test_tensor_data_past_end_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    const int64_t ne[2] = {8, 4};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "blk.3.attn_q.weight", 2, ne, FL_TYPE_F32, 0);
    gb_pad(&b, 32);
    gb_zeros(&b, 8 * 4 * 4 - 1);
    expect_fail(&b, FL_EFORMAT, "tensor 'blk.3.attn_q.weight' data [offset 0, 128 bytes] runs past end of file (size 223");
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "t", 2, ne, FL_TYPE_F32, UINT64_MAX - 31); /* offset + nbytes overflows */
    gb_pad(&b, 32);
    gb_zeros(&b, 256);
    expect_fail(&b, FL_EFORMAT, "runs past end of file");
    /* exactly fitting is fine, with no padding after the last tensor */
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "t", 2, ne, FL_TYPE_F32, 0);
    gb_pad(&b, 32);
    gb_zeros(&b, 128);
    gguf_t *g = open_ok(&b);
    assert_int_equal(gguf_tensor(g, 0)->nbytes, 128);
    gguf_destroy(&g);
    free(b.p);
}

static void test_bad_tensor_shapes_fail(void **state)
{
    (void)state;
    gb_t b = {0};
    const int64_t huge[4] = {1ll << 32, 1ll << 32, 1, 1};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 2, huge, FL_TYPE_F32, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "tensor 'w' shape [4294967296, 4294967296, 1, 1] overflows");
    const int64_t bytes_overflow[4] = {1ll << 40, 1ll << 22, 1, 1}; /* elements fit, bytes do not */
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 2, bytes_overflow, FL_TYPE_F32, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "overflows");
    const int64_t neg[2] = {4, -1};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 2, neg, FL_TYPE_F32, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "negative dimension");
    const int64_t ne[4] = {32, 1, 1, 1};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 0, ne, FL_TYPE_F32, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "tensor 'w' has 0 dimensions");
    gb_header(&b, 3, 1, 0);
    gb_str(&b, "w");
    gb_u32(&b, 5);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "tensor 'w' has 5 dimensions");
    const int64_t odd[1] = {33};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 1, odd, FL_TYPE_Q4_0, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "not a multiple of the block size 32");
}

static void test_unknown_tensor_type_fails(void **state)
{
    (void)state;
    gb_t b = {0};
    const int64_t ne[1] = {32};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "blk.0.ffn_up.weight", 1, ne, 77, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "tensor 'blk.0.ffn_up.weight' has unknown type 77");
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 1, ne, 4, 0); /* Q4_2, removed from ggml */
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EUNSUPPORTED, "type Q4_2 (4)");
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "w", 1, ne, FL_TYPE_Q8_1, 0);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EUNSUPPORTED, "Q8_1");
    /* a K-quant opens (the model loader decides it is unsupported), with ggml's block size */
    const int64_t ne256[1] = {256};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "k", 1, ne256, 12, 0);
    gb_pad(&b, 32);
    gb_zeros(&b, 144);
    gguf_t *g = open_ok(&b);
    assert_int_equal(gguf_tensor(g, 0)->nbytes, 144);
    assert_false(fl_dtype_supported(gguf_tensor(g, 0)->type));
    gguf_destroy(&g);
    free(b.p);
}

static void test_duplicate_names_fail(void **state)
{
    (void)state;
    gb_t b = {0};
    gb_header(&b, 3, 0, 2);
    gb_kv_u32(&b, "llama.block_count", 1);
    gb_kv_u32(&b, "llama.block_count", 2);
    expect_fail(&b, FL_EFORMAT, "duplicate key 'llama.block_count'");
    const int64_t ne[1] = {8};
    gb_header(&b, 3, 2, 0);
    gb_tensor(&b, "w", 1, ne, FL_TYPE_F32, 0);
    gb_tensor(&b, "w", 1, ne, FL_TYPE_F32, 32);
    gb_pad(&b, 32);
    gb_zeros(&b, 64);
    expect_fail(&b, FL_EFORMAT, "duplicate tensor name 'w'");
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "");
    gb_u32(&b, GGUF_TYPE_UINT32);
    gb_u32(&b, 1);
    gb_zeros(&b, 16);
    expect_fail(&b, FL_EFORMAT, "empty name");
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, 3);
    gb_put(&b, "a\0b", 3);
    gb_u32(&b, GGUF_TYPE_UINT32);
    gb_u32(&b, 1);
    gb_zeros(&b, 16);
    expect_fail(&b, FL_EFORMAT, "NUL byte");
}

/* Every prefix of a valid file either fails cleanly or opens with all data in bounds. */
static void test_every_truncation_of_a_valid_file_is_safe(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 1;
    p.dim = 32;
    p.ff = 64;
    p.n_heads = 2;
    p.n_kv_heads = 1;
    p.vocab = 300;
    p.type = FL_TYPE_Q8_0;
    fl_error_t err = {0};
    const char *path = tmp_path("trunc.gguf");
    assert_int_equal(mkmodel_write(&p, path, &err), 0);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size);
    assert_int_equal(fread(buf, 1, (size_t)size, f), size);
    fclose(f);
    int opened = 0;
    for (long n = 0; n <= size; n++) {
        uint8_t *copy = malloc(n ? (size_t)n : 1); /* exact-size copy so ASan sees over-reads */
        memcpy(copy, buf, (size_t)n);
        gguf_t *g = gguf_open_memory(copy, (size_t)n, "t.gguf", &err);
        if (g) {
            opened++;
            for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
                const gguf_tensor_t *t = gguf_tensor(g, i);
                assert_true((const uint8_t *)t->data + t->nbytes <= copy + n);
            }
            gguf_destroy(&g);
        } else {
            assert_true(err.msg[0] != 0);
            assert_int_equal(strncmp(err.msg, "t.gguf: ", 8), 0);
        }
        free(copy);
    }
    assert_true(opened >= 1 && opened <= 32); /* only the trailing padding may go */
    free(buf);
}

/* ---- reference quantizers ---- */

static float block_amax(const float *x)
{
    float a = 0;
    for (int j = 0; j < 32; j++) a = fmaxf(a, fabsf(x[j]));
    return a;
}

/* quant_rows_to_f16 (a GPU backend's weight load): each value is quant_dequantize_row's, rounded to
 * fp16, whatever the number of threads (more threads than rows too). */
static void test_quant_rows_to_f16_matches_row_dequantization(void **state)
{
    (void)state;
    enum { ROWS = 37, COLS = 96 };
    float *x = malloc(ROWS * COLS * sizeof(float)), *row = malloc(COLS * sizeof(float));
    uint8_t *q = malloc(ROWS * COLS * 4);
    uint16_t *want = malloc(ROWS * COLS * 2), *got = malloc(ROWS * COLS * 2);
    for (int i = 0; i < ROWS * COLS; i++) x[i] = sinf((float)i * 0.37f) * (float)(1 + i % 11);
    const int types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const int ty = types[t];
        const size_t rb = fl_dtype_row_bytes(ty, COLS);
        for (int r = 0; r < ROWS; r++) assert_int_equal(quant_quantize_row(ty, x + r * COLS, q + r * rb, COLS), rb);
        for (int r = 0; r < ROWS; r++) {
            quant_dequantize_row(ty, q + r * rb, row, COLS);
            for (int i = 0; i < COLS; i++) want[r * COLS + i] = fl_f32_to_f16(row[i]);
        }
        const int threads[] = {1, 5, 64};
        for (int k = 0; k < 3; k++) {
            memset(got, 0xff, ROWS * COLS * 2);
            assert_int_equal(quant_rows_to_f16(ty, q, rb, got, ROWS, COLS, threads[k]), 0);
            assert_memory_equal(got, want, ROWS * COLS * 2);
        }
    }
    free(x), free(row), free(q), free(want), free(got);
}

static void test_quant_round_trip_within_bounds(void **state)
{
    (void)state;
    enum { N = 32 * 64 };
    float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float));
    uint8_t *q = malloc(N * 4);
    uint64_t s = 12345;
    for (int i = 0; i < N; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const float u = (float)(s >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
        x[i] = u * (float)(1 + (i / 32) % 7) + ((i / 32) % 5 == 0 ? 3.0f : 0.0f); /* varied scales and offsets */
    }
    memset(x + 32 * 3, 0, 32 * sizeof(float)); /* an all-zero block */
    const int types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0, FL_TYPE_Q8_1};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const int ty = types[t];
        assert_true(quant_row_ok(ty, N));
        assert_int_equal(quant_quantize_row(ty, x, q, N), fl_dtype_row_bytes(ty, N));
        quant_dequantize_row(ty, q, y, N);
        for (int b = 0; b < N / 32; b++) {
            const float *xb = x + 32 * b, *yb = y + 32 * b;
            const float amax = block_amax(xb);
            float mn = xb[0], mx = xb[0];
            for (int j = 0; j < 32; j++) mn = fminf(mn, xb[j]), mx = fmaxf(mx, xb[j]);
            for (int j = 0; j < 32; j++) {
                const float e = fabsf(xb[j] - yb[j]);
                float bound;
                switch (ty) {
                case FL_TYPE_F32: bound = 0; break;
                case FL_TYPE_F16: bound = fabsf(xb[j]) * (1.0f / 2048) + 1e-7f; break;
                case FL_TYPE_BF16: bound = fabsf(xb[j]) * (1.0f / 256) + 1e-30f; break;
                case FL_TYPE_Q4_0: bound = amax / 8 * 1.01f + amax * 1e-3f; break; /* a step: +8 clamps to 7 */
                case FL_TYPE_Q4_1: bound = (mx - mn) / 15 * 0.5f * 1.01f + amax * 2e-3f; break;
                case FL_TYPE_Q8_0: bound = amax / 127 * 0.5f * 1.01f + amax * 1e-3f; break;
                default: bound = amax / 127 * 0.5f * 1.001f; break; /* Q8_1: f32 scale */
                }
                if (e > bound)
                    fail_msg("%s block %d elem %d: x=%g y=%g err=%g bound=%g", fl_dtype_name(ty), b, j, xb[j], yb[j], e, bound);
            }
        }
    }
    /* Q8_1 carries s = d * sum(q) */
    quant_quantize_row(FL_TYPE_Q8_1, x, q, N);
    for (int b = 0; b < N / 32; b++) {
        const fl_block_q8_1_t *blk = (const fl_block_q8_1_t *)q + b;
        int sum = 0;
        for (int j = 0; j < 32; j++) sum += blk->qs[j];
        assert_true(fabsf(blk->s - blk->d * (float)sum) <= 1e-6f * fabsf(blk->d * (float)sum) + 1e-30f);
    }
    /* bad sizes and types are refused */
    assert_int_equal(quant_quantize_row(FL_TYPE_Q4_0, x, q, 33), 0);
    assert_int_equal(quant_quantize_row(17, x, q, 32), 0);
    assert_false(quant_row_ok(FL_TYPE_Q8_0, 48));
    assert_true(quant_row_ok(FL_TYPE_F16, 3));
    free(x);
    free(y);
    free(q);
}

static void test_quant_known_vectors(void **state)
{
    (void)state;
    float x[32], y[32];
    /* Q4_0: x = j%16 - 8, largest magnitude -8 comes first: d = -8/-8 = 1, q = j%16 */
    for (int j = 0; j < 32; j++) x[j] = (float)(j % 16 - 8);
    fl_block_q4_0_t b40;
    assert_int_equal(quant_quantize_row(FL_TYPE_Q4_0, x, &b40, 32), 18);
    assert_int_equal(b40.d, 0x3c00);
    for (int j = 0; j < 16; j++) assert_int_equal(b40.qs[j], j * 17);
    quant_dequantize_row(FL_TYPE_Q4_0, &b40, y, 32);
    assert_memory_equal(x, y, sizeof x);
    /* Q4_0 with the largest magnitude positive: d = -max/8, so +max maps to q = 0 */
    for (int j = 0; j < 32; j++) x[j] = j == 5 ? 16.0f : 0.0f;
    quant_quantize_row(FL_TYPE_Q4_0, x, &b40, 32);
    assert_int_equal(b40.d, fl_f32_to_f16(-2.0f));
    assert_int_equal(b40.qs[5] & 0xf, 0);
    assert_int_equal(b40.qs[0], 0x88);
    /* Q4_1: x = 1 + 0.5 * (j%16): d = 0.5, m = 1, q = j%16 */
    for (int j = 0; j < 32; j++) x[j] = 1.0f + 0.5f * (float)(j % 16);
    fl_block_q4_1_t b41;
    assert_int_equal(quant_quantize_row(FL_TYPE_Q4_1, x, &b41, 32), 20);
    assert_int_equal(b41.d, 0x3800);
    assert_int_equal(b41.m, 0x3c00);
    for (int j = 0; j < 16; j++) assert_int_equal(b41.qs[j], j * 17);
    quant_dequantize_row(FL_TYPE_Q4_1, &b41, y, 32);
    assert_memory_equal(x, y, sizeof x);
    /* Q8_0 / Q8_1: x0 = -127, xj = j: d = 1, q = x, s = 369 */
    x[0] = -127;
    for (int j = 1; j < 32; j++) x[j] = (float)j;
    fl_block_q8_0_t b80;
    assert_int_equal(quant_quantize_row(FL_TYPE_Q8_0, x, &b80, 32), 34);
    assert_int_equal(b80.d, 0x3c00);
    for (int j = 0; j < 32; j++) assert_int_equal(b80.qs[j], (int)x[j]);
    quant_dequantize_row(FL_TYPE_Q8_0, &b80, y, 32);
    assert_memory_equal(x, y, sizeof x);
    fl_block_q8_1_t b81;
    assert_int_equal(quant_quantize_row(FL_TYPE_Q8_1, x, &b81, 32), 40);
    assert_true(b81.d == 1.0f);
    assert_true(b81.s == 369.0f);
    quant_dequantize_row(FL_TYPE_Q8_1, &b81, y, 32);
    assert_memory_equal(x, y, sizeof x);
    /* Q8_0 rounds half away from zero (roundf): 0.5 * d -> 1 */
    for (int j = 0; j < 32; j++) x[j] = 0;
    x[0] = 127;
    x[1] = 0.5f;
    x[2] = -0.5f;
    quant_quantize_row(FL_TYPE_Q8_0, x, &b80, 32);
    assert_int_equal(b80.qs[1], 1);
    assert_int_equal(b80.qs[2], -1);
    /* all-zero blocks: d = -0 (0 / -8, as ggml), Q4_0 nibbles at the zero point 8 */
    memset(x, 0, sizeof x);
    quant_quantize_row(FL_TYPE_Q4_0, x, &b40, 32);
    assert_int_equal(b40.d & 0x7fff, 0);
    assert_int_equal(b40.qs[7], 0x88);
    quant_dequantize_row(FL_TYPE_Q4_0, &b40, y, 32);
    for (int j = 0; j < 32; j++) assert_true(y[j] == 0.0f); /* -0 == 0 */
    /* F16 and BF16 encodings */
    const float fx[4] = {1.0f, -2.0f, 65504.0f, 1.0f / 3.0f};
    uint16_t h[4];
    quant_quantize_row(FL_TYPE_F16, fx, h, 4);
    assert_int_equal(h[0], 0x3c00);
    assert_int_equal(h[1], 0xc000);
    assert_int_equal(h[2], 0x7bff);
    assert_int_equal(h[3], 0x3555);
    quant_quantize_row(FL_TYPE_BF16, fx, h, 4);
    assert_int_equal(h[0], 0x3f80);
    assert_int_equal(h[1], 0xc000);
    assert_int_equal(h[3], 0x3eab);
}

/* ---- the default model ---- */

static bool g_model_missing; /* then main exits 77: ctest says Skipped, not Passed */

static void test_default_model_opens_with_expected_metadata(void **state)
{
    (void)state;
    char path[4096];
    if (!test_model_path(path, sizeof path)) {
        g_model_missing = true;
        skip();
    }
    fl_error_t err = {0};
    gguf_t *g = gguf_open(path, &err);
    if (!g) fail_msg("%s", err.msg);
    assert_int_equal(gguf_n_tensors(g), 272);
    const char *s;
    size_t len;
    assert_int_equal(gguf_get_str(g, "general.architecture", &s, &len, &err), 0);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "llama", 5);
    uint32_t u;
    assert_int_equal(gguf_get_u32(g, "llama.block_count", &u, &err), 0);
    assert_int_equal(u, 30);
    assert_int_equal(gguf_get_u32(g, "llama.embedding_length", &u, &err), 0);
    assert_int_equal(u, 576);
    assert_int_equal(gguf_get_u32(g, "llama.attention.head_count", &u, &err), 0);
    assert_int_equal(u, 9);
    assert_int_equal(gguf_get_u32(g, "llama.attention.head_count_kv", &u, &err), 0);
    assert_int_equal(u, 3);
    float f;
    assert_int_equal(gguf_get_f32(g, "llama.rope.freq_base", &f, &err), 0);
    assert_true(f == 100000.0f);
    gguf_value_type_t et;
    uint64_t n;
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, &err), 0);
    assert_int_equal(et, GGUF_TYPE_STRING);
    assert_int_equal(n, 49152);
    assert_int_equal(gguf_arr_str(g, "tokenizer.ggml.tokens", 0, &s, &len), 0);
    assert_int_equal(len, 13);
    assert_memory_equal(s, "<|endoftext|>", 13);
    assert_int_equal(gguf_arr_str(g, "tokenizer.ggml.tokens", 49151, &s, &len), 0);
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n, &err), 0);
    assert_int_equal(n, 48900);
    const gguf_tensor_t *t = gguf_find_tensor(g, "blk.29.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->type, FL_TYPE_Q4_1);
    assert_int_equal(t->ne[0], 1536);
    assert_int_equal(t->ne[1], 576);
    t = gguf_find_tensor(g, "token_embd.weight");
    assert_int_equal(t->type, FL_TYPE_Q8_0);
    assert_int_equal(t->ne[1], 49152);
    assert_int_equal(gguf_find_tensor(g, "output_norm.weight")->type, FL_TYPE_F32);
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) assert_true(fl_dtype_supported(gguf_tensor(g, i)->type));
    gguf_destroy(&g);
}

/* ---- the model generator ---- */

static int tok_index(const gguf_t *g, const char *s, size_t len, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        const char *t;
        size_t l;
        gguf_arr_str(g, "tokenizer.ggml.tokens", i, &t, &l);
        if (l == len && memcmp(t, s, len) == 0) return (int)i;
    }
    return -1;
}

static void check_model(const char *path, const mkmodel_params_t *p)
{
    fl_error_t err = {0};
    gguf_t *g = gguf_open(path, &err);
    if (!g) fail_msg("%s", err.msg);
    assert_int_equal(gguf_n_tensors(g), 2 + 9 * p->n_layers + (p->tied ? 0 : 1));
    uint32_t u;
    const char *s;
    size_t len;
    bool b;
    gguf_get_str(g, "general.architecture", &s, &len, &err);
    assert_memory_equal(s, "llama", 5);
    assert_int_equal(gguf_get_u32(g, "llama.block_count", &u, &err), 0);
    assert_int_equal(u, p->n_layers);
    assert_int_equal(gguf_get_u32(g, "llama.embedding_length", &u, &err), 0);
    assert_int_equal(u, p->dim);
    assert_int_equal(gguf_get_u32(g, "llama.feed_forward_length", &u, &err), 0);
    assert_int_equal(u, p->ff);
    assert_int_equal(gguf_get_u32(g, "llama.attention.head_count_kv", &u, &err), 0);
    assert_int_equal(u, p->n_kv_heads);
    assert_int_equal(gguf_get_u32(g, "llama.rope.dimension_count", &u, &err), 0);
    assert_int_equal(u, p->dim / p->n_heads);
    assert_int_equal(gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &u, &err), 0);
    assert_int_equal(u, 2);
    assert_int_equal(gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &err), 0);
    assert_false(b);
    assert_int_equal(gguf_get_str(g, "tokenizer.chat_template", &s, &len, &err), 0);
    gguf_value_type_t et;
    uint64_t nv, nm;
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &nv, &err), 0);
    assert_int_equal(nv, p->vocab);
    gguf_arr_str(g, "tokenizer.ggml.tokens", 0, &s, &len);
    assert_memory_equal(s, "<|endoftext|>", len);
    gguf_arr_str(g, "tokenizer.ggml.tokens", 2, &s, &len);
    assert_memory_equal(s, "<|im_end|>", len);
    gguf_arr_str(g, "tokenizer.ggml.tokens", MKMODEL_FIRST_BYTE_TOKEN + 'a', &s, &len);
    assert_memory_equal(s, "a", len);
    gguf_arr_str(g, "tokenizer.ggml.tokens", MKMODEL_FIRST_BYTE_TOKEN + ' ', &s, &len);
    assert_int_equal(len, 2);
    assert_memory_equal(s, "\xc4\xa0", 2); /* Ġ */
    int32_t tt[3];
    memcpy(tt, gguf_arr_data(g, "tokenizer.ggml.token_type"), sizeof tt);
    assert_int_equal(tt[0], 3);
    assert_int_equal(tt[2], 3);
    memcpy(tt, (const int32_t *)gguf_arr_data(g, "tokenizer.ggml.token_type") + 3, 4);
    assert_int_equal(tt[0], 1);
    /* every merge "a b": a and b are tokens and a+b is a token */
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.merges", &et, &nm, &err), 0);
    assert_int_equal(nm, p->vocab - 259);
    for (uint64_t i = 0; i < nm; i++) {
        gguf_arr_str(g, "tokenizer.ggml.merges", i, &s, &len);
        const char *sp = memchr(s, ' ', len);
        assert_non_null(sp);
        const size_t la = (size_t)(sp - s), lb = len - la - 1;
        assert_true(tok_index(g, s, la, nv) >= 0);
        assert_true(tok_index(g, sp + 1, lb, nv) >= 0);
        char joined[256];
        assert_true(la + lb < sizeof joined);
        memcpy(joined, s, la);
        memcpy(joined + la, sp + 1, lb);
        const int id = tok_index(g, joined, la + lb, nv);
        assert_int_equal(id, 259 + (int)i); /* merge i produces token 259 + i */
    }
    const gguf_tensor_t *t = gguf_find_tensor(g, "blk.0.attn_k.weight");
    assert_non_null(t);
    assert_int_equal(t->type, p->type);
    assert_int_equal(t->ne[0], p->dim);
    assert_int_equal(t->ne[1], p->dim / p->n_heads * p->n_kv_heads);
    t = gguf_find_tensor(g, "blk.0.ffn_down.weight");
    assert_int_equal(t->ne[0], p->ff);
    assert_int_equal(t->ne[1], p->dim);
    assert_int_equal(gguf_find_tensor(g, "output_norm.weight")->type, FL_TYPE_F32);
    assert_true((gguf_find_tensor(g, "output.weight") == NULL) == p->tied);
    /* weights: std about 0.02, norms about 1 */
    t = gguf_find_tensor(g, "blk.0.ffn_gate.weight");
    const int64_t n = t->ne[0] * t->ne[1];
    float *w = malloc(sizeof(float) * (size_t)n);
    quant_dequantize_row(t->type, t->data, w, n);
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < n; i++) sum += w[i], sq += (double)w[i] * w[i];
    const double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
    assert_true(fabs(mean) < 0.003);
    assert_true(sd > 0.015 && sd < 0.025);
    free(w);
    t = gguf_find_tensor(g, "blk.0.attn_norm.weight");
    for (int64_t i = 0; i < t->ne[0]; i++) {
        const float v = ((const float *)t->data)[i];
        assert_true(v > 0.9f && v < 1.1f);
    }
    gguf_destroy(&g);
}

static void test_mkmodel_writes_openable_llama_models(void **state)
{
    (void)state;
    const int types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        mkmodel_params_t p;
        mkmodel_params_default(&p);
        p.type = types[i];
        p.tied = i % 2 == 1;
        p.vocab = 400 + (int)i;
        fl_error_t err = {0};
        const char *path = tmp_path("mk.gguf");
        if (mkmodel_write(&p, path, &err)) fail_msg("%s", err.msg);
        check_model(path, &p);
    }
}

static int file_equal(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int eq = fa && fb, ca, cb;
    while (eq && (ca = fgetc(fa)) != EOF) {
        cb = fgetc(fb);
        eq = ca == cb;
    }
    if (eq) eq = fgetc(fb) == EOF;
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}

static void test_mkmodel_is_deterministic_per_seed(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.type = FL_TYPE_Q4_0;
    fl_error_t err = {0};
    p.threads = 1;
    assert_int_equal(mkmodel_write(&p, tmp_path("s1a.gguf"), &err), 0);
    p.threads = 5; /* tensors written concurrently, at their offsets: the same bytes */
    assert_int_equal(mkmodel_write(&p, tmp_path("s1b.gguf"), &err), 0);
    p.seed = 2;
    assert_int_equal(mkmodel_write(&p, tmp_path("s2.gguf"), &err), 0);
    assert_true(file_equal(tmp_path("s1a.gguf"), tmp_path("s1b.gguf")));
    assert_false(file_equal(tmp_path("s1a.gguf"), tmp_path("s2.gguf")));
    /* more layers and an untied output, F16, on 3 threads */
    p.seed = 1, p.n_layers = 5, p.tied = false, p.type = FL_TYPE_F16, p.threads = 1;
    assert_int_equal(mkmodel_write(&p, tmp_path("s3a.gguf"), &err), 0);
    p.threads = 3;
    assert_int_equal(mkmodel_write(&p, tmp_path("s3b.gguf"), &err), 0);
    assert_true(file_equal(tmp_path("s3a.gguf"), tmp_path("s3b.gguf")));
}

static void test_mkmodel_rejects_bad_shapes(void **state)
{
    (void)state;
    mkmodel_params_t p;
    fl_error_t err = {0};
    mkmodel_params_default(&p);
    assert_int_equal(mkmodel_check(&p, &err), 0);
    p.n_heads = 5;
    assert_int_equal(mkmodel_check(&p, &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "heads"));
    mkmodel_params_default(&p);
    p.n_kv_heads = 3;
    assert_int_equal(mkmodel_check(&p, &err), FL_EINVAL);
    mkmodel_params_default(&p);
    p.vocab = 258;
    assert_int_equal(mkmodel_check(&p, &err), FL_EINVAL);
    mkmodel_params_default(&p);
    p.dim = 48;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.type = FL_TYPE_Q8_0;
    assert_int_equal(mkmodel_check(&p, &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "multiple of 32"));
    p.type = FL_TYPE_F16;
    assert_int_equal(mkmodel_check(&p, &err), 0);
    assert_int_equal(mkmodel_write(&p, tmp_path("d48.gguf"), &err), 0);
    mkmodel_params_default(&p);
    p.type = FL_TYPE_Q8_1;
    assert_int_equal(mkmodel_write(&p, tmp_path("never.gguf"), &err), FL_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_every_metadata_and_tensor_type),
        cmocka_unit_test(test_writer_custom_alignment_is_honoured),
        cmocka_unit_test(test_writer_reports_first_error_at_write),
        cmocka_unit_test(test_open_missing_file_and_short_file),
        cmocka_unit_test(test_truncated_header_fails),
        cmocka_unit_test(test_bad_magic_fails),
        cmocka_unit_test(test_bad_version_fails),
        cmocka_unit_test(test_huge_counts_fail_before_allocating),
        cmocka_unit_test(test_string_length_past_end_fails),
        cmocka_unit_test(test_unknown_value_type_names_key),
        cmocka_unit_test(test_bad_alignment_fails),
        cmocka_unit_test(test_tensor_data_past_end_fails),
        cmocka_unit_test(test_bad_tensor_shapes_fail),
        cmocka_unit_test(test_unknown_tensor_type_fails),
        cmocka_unit_test(test_duplicate_names_fail),
        cmocka_unit_test(test_every_truncation_of_a_valid_file_is_safe),
        cmocka_unit_test(test_quant_round_trip_within_bounds),
        cmocka_unit_test(test_quant_known_vectors),
        cmocka_unit_test(test_default_model_opens_with_expected_metadata),
        cmocka_unit_test(test_quant_rows_to_f16_matches_row_dequantization),
        cmocka_unit_test(test_mkmodel_writes_openable_llama_models),
        cmocka_unit_test(test_mkmodel_is_deterministic_per_seed),
        cmocka_unit_test(test_mkmodel_rejects_bad_shapes),
    };
    const int rc = cmocka_run_group_tests(tests, setup_tmpdir, teardown_tmpdir);
    return rc || !g_model_missing ? rc : TEST_EXIT_SKIPPED;
}
