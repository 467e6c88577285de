/* api_keys.h - the gateway's API keys: a file of lines `KEY TENANT` (blank lines and lines starting
 * with '#' skipped). A request names its key as `Authorization: Bearer KEY`; the key's tenant is
 * the tenant its Generate carries, so tenants (prefix-cache namespaces, in-flight shares) are set by
 * the operator's file, never by the caller. */
#ifndef FOLIO_GW_API_KEYS_H
#define FOLIO_GW_API_KEYS_H

#include "error.h"

#define API_KEY_MAX_LEN 256

typedef struct api_keys api_keys_t;

/* NULL with err set when the file cannot be read, a line has no tenant or more than two fields, a
 * key repeats, or no key is given. */
api_keys_t *api_keys_load(const char *path, fl_error_t *err);
api_keys_t *api_keys_parse(const char *text, const char *name, fl_error_t *err);
void api_keys_destroy(api_keys_t **kp);
int api_keys_count(const api_keys_t *k);
/* The tenant of the key an Authorization header value names ("Bearer KEY", the scheme in any case),
 * or NULL when the header is absent, malformed or names no key. Borrowed from k. Every key is
 * compared in full, so the time taken does not tell how much of a key matched. */
const char *api_keys_tenant(const api_keys_t *k, const char *authorization);

#endif
