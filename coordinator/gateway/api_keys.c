/* api_keys.c - see api_keys.h. */
#include "api_keys.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "file_read.h"

typedef struct api_key {
    char *key, *tenant;
    size_t key_len;
} api_key_t;

struct api_keys {
    api_key_t *keys;
    int n;
};

void api_keys_destroy(api_keys_t **kp)
{
    if (!kp || !*kp) return;
    api_keys_t *k = *kp;
    for (int i = 0; i < k->n; i++) {
        free(k->keys[i].key);
        free(k->keys[i].tenant);
    }
    free(k->keys);
    free(k);
    *kp = NULL;
}

int api_keys_count(const api_keys_t *k)
{
    return k ? k->n : 0;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

/* The next white-space separated field of [*p, end), or NULL; advances *p. */
static const char *next_field(const char **p, const char *end, size_t *len)
{
    while (*p < end && is_space(**p)) (*p)++;
    if (*p >= end) return NULL;
    const char *s = *p;
    while (*p < end && !is_space(**p)) (*p)++;
    *len = (size_t)(*p - s);
    return s;
}

api_keys_t *api_keys_parse(const char *text, const char *name, fl_error_t *err)
{
    api_keys_t *k = calloc(1, sizeof *k);
    if (!k) {
        fl_fail(err, FL_ENOMEM, "api keys: out of memory");
        return NULL;
    }
    int line_no = 0;
    for (const char *line = text; line && *line;) {
        const char *nl = strchr(line, '\n'), *end = nl ? nl : line + strlen(line);
        line_no++;
        const char *p = line;
        size_t klen = 0, tlen = 0, xlen = 0;
        const char *key = next_field(&p, end, &klen);
        if (key && *key != '#') {
            const char *tenant = next_field(&p, end, &tlen);
            const char *extra = next_field(&p, end, &xlen);
            if (!tenant || extra) {
                fl_fail(err, FL_EFORMAT, "%s:%d: expected `KEY TENANT`, got %s", name, line_no,
                        tenant ? "more than two fields" : "a key without a tenant");
                goto fail;
            }
            if (klen > API_KEY_MAX_LEN || tlen > API_KEY_MAX_LEN) {
                fl_fail(err, FL_EFORMAT, "%s:%d: a key or tenant longer than %d bytes", name, line_no, API_KEY_MAX_LEN);
                goto fail;
            }
            for (int i = 0; i < k->n; i++)
                if (k->keys[i].key_len == klen && !memcmp(k->keys[i].key, key, klen)) {
                    fl_fail(err, FL_EFORMAT, "%s:%d: the key of line %d again", name, line_no, i + 1);
                    goto fail;
                }
            api_key_t *grown = realloc(k->keys, (size_t)(k->n + 1) * sizeof *grown);
            if (!grown) {
                fl_fail(err, FL_ENOMEM, "api keys: out of memory");
                goto fail;
            }
            k->keys = grown;
            api_key_t *e = &k->keys[k->n];
            e->key = strndup(key, klen);
            e->tenant = strndup(tenant, tlen);
            e->key_len = klen;
            if (!e->key || !e->tenant) {
                free(e->key);
                free(e->tenant);
                fl_fail(err, FL_ENOMEM, "api keys: out of memory");
                goto fail;
            }
            k->n++;
        }
        line = nl ? nl + 1 : NULL;
    }
    if (!k->n) {
        fl_fail(err, FL_EFORMAT, "%s: no keys (lines `KEY TENANT`)", name);
        goto fail;
    }
    return k;
fail:
    api_keys_destroy(&k);
    return NULL;
}

api_keys_t *api_keys_load(const char *path, fl_error_t *err)
{
    size_t len = 0;
    char *text = fl_read_file(path, &len);
    if (!text) {
        fl_fail(err, FL_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    api_keys_t *k = NULL;
    if (memchr(text, 0, len))
        fl_fail(err, FL_EFORMAT, "%s: a NUL byte in the key file", path);
    else
        k = api_keys_parse(text, path, err);
    free(text);
    return k;
}

const char *api_keys_tenant(const api_keys_t *k, const char *authorization)
{
    if (!k || !authorization || strncasecmp(authorization, "Bearer ", 7)) return NULL;
    const char *key = authorization + 7;
    while (*key == ' ') key++;
    size_t len = strlen(key);
    while (len && (key[len - 1] == ' ' || key[len - 1] == '\t')) len--;
    const char *tenant = NULL;
    for (int i = 0; i < k->n; i++) {
        const api_key_t *e = &k->keys[i];
        unsigned char diff = e->key_len != len;
        for (size_t j = 0; j < e->key_len; j++) diff |= (unsigned char)(e->key[j] ^ (j < len ? key[j] : 0));
        if (!diff) tenant = e->tenant;
    }
    return tenant;
}
