/* fuzz_gguf.c - libFuzzer target for the GGUF reader.
 *
 * Parses the input with gguf_open_memory() (no temp files) from an exact-size heap copy, so ASan
 * catches any read past the end, and on success walks every accessor: each key through each typed
 * getter, every string array element, every numeric array's bytes, and every tensor's data. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

static volatile uint8_t sink;

static void touch(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint8_t x = 0;
    if (n) x ^= b[0] ^ b[n - 1] ^ b[n / 2];
    sink ^= x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    fl_error_t err = {0};
    gguf_t *g = gguf_open_memory(copy, size, "fuzz.gguf", &err);
    if (!g) {
        if (!err.msg[0]) abort(); /* every failure must say why */
        free(copy);
        return 0;
    }
    (void)gguf_path(g);
    (void)gguf_version(g);
    (void)gguf_alignment(g);
    if (gguf_data_offset(g) > gguf_file_size(g) + gguf_alignment(g)) abort();
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        const char *key = gguf_key_name(g, i);
        if (!key || gguf_find_key(g, key) != i) abort();
        const gguf_value_type_t t = gguf_kv_type(g, i);
        (void)gguf_type_name(t);
        uint32_t u32;
        int64_t i64;
        float f;
        bool b;
        const char *s;
        size_t len;
        gguf_value_type_t et;
        uint64_t n;
        (void)gguf_get_u32(g, key, &u32, &err);
        (void)gguf_get_i64(g, key, &i64, &err);
        (void)gguf_get_f32(g, key, &f, &err);
        (void)gguf_get_bool(g, key, &b, &err);
        if (gguf_get_str(g, key, &s, &len, &err) == 0) touch(s, len);
        if (gguf_get_arr(g, key, &et, &n, &err) == 0) {
            if (et == GGUF_TYPE_STRING) {
                for (uint64_t k = 0; k < n; k++) {
                    if (gguf_arr_str(g, key, k, &s, &len) != 0) abort();
                    touch(s, len);
                }
                if (gguf_arr_str(g, key, n, &s, &len) == 0) abort();
            } else {
                const void *d = gguf_arr_data(g, key);
                if (n && !d) abort();
                touch(d, (size_t)n * gguf_type_size(et));
            }
        }
    }
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        if (gguf_find_tensor(g, t->name) != t) abort();
        if (t->nbytes && (const uint8_t *)t->data + t->nbytes > copy + size) abort();
        touch(t->data, t->nbytes);
    }
    (void)gguf_tensor(g, gguf_n_tensors(g));
    (void)gguf_find_tensor(g, "token_embd.weight");
    gguf_destroy(&g);
    free(copy);
    return 0;
}
