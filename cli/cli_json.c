/* cli_json.c - folioctl's JSON printer; see cli_json.h. The protobuf side walks the message's
 * descriptor, so a field added to folio.proto appears in `status --json` with no code here. */
#include "cli_json.h"

#include <cjson/cJSON.h>
#include <stdio.h>

#include "wire.h"

static cJSON *pb_value_json(const ProtobufCFieldDescriptor *fd, const void *p)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        return cJSON_CreateNumber(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return cJSON_CreateNumber(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        return cJSON_CreateNumber((double)*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return cJSON_CreateNumber((double)*(const uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT:
        return cJSON_CreateNumber(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE:
        return cJSON_CreateNumber(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL:
        return cJSON_CreateBool(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM: {
        const int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(fd->descriptor, v);
        return ev ? cJSON_CreateString(ev->name) : cJSON_CreateNumber(v);
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *str = *(char *const *)p;
        return cJSON_CreateString(str ? str : "");
    }
    case PROTOBUF_C_TYPE_BYTES:
        return cJSON_CreateNull();
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *m = *(ProtobufCMessage *const *)p;
        if (!m) return cJSON_CreateNull();
        cJSON *o = cJSON_CreateObject();
        const ProtobufCMessageDescriptor *d = m->descriptor;
        for (unsigned i = 0; i < d->n_fields; i++) {
            const ProtobufCFieldDescriptor *f = &d->fields[i];
            const char *base = (const char *)m;
            if (f->label == PROTOBUF_C_LABEL_REPEATED) {
                const size_t n = *(const size_t *)(base + f->quantifier_offset);
                const char *arr = *(char *const *)(base + f->offset);
                size_t sz = 0;
                switch (f->type) {
                case PROTOBUF_C_TYPE_INT64:
                case PROTOBUF_C_TYPE_SINT64:
                case PROTOBUF_C_TYPE_SFIXED64:
                case PROTOBUF_C_TYPE_UINT64:
                case PROTOBUF_C_TYPE_FIXED64:
                case PROTOBUF_C_TYPE_DOUBLE:
                    sz = 8;
                    break;
                case PROTOBUF_C_TYPE_STRING:
                case PROTOBUF_C_TYPE_MESSAGE:
                    sz = sizeof(void *);
                    break;
                case PROTOBUF_C_TYPE_BOOL:
                    sz = sizeof(protobuf_c_boolean);
                    break;
                case PROTOBUF_C_TYPE_BYTES:
                    sz = sizeof(ProtobufCBinaryData);
                    break;
                default:
                    sz = 4;
                    break;
                }
                cJSON *a = cJSON_AddArrayToObject(o, f->name);
                for (size_t k = 0; k < n; k++) cJSON_AddItemToArray(a, pb_value_json(f, arr + k * sz));
            } else {
                cJSON_AddItemToObject(o, f->name, pb_value_json(f, base + f->offset));
            }
        }
        return o;
    }
    }
    return cJSON_CreateNull();
}

static void print_line(cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);
    printf("%s\n", s);
    fflush(stdout);
    cJSON_free(s);
    cJSON_Delete(o);
}

void cli_json_print_pb(const ProtobufCMessage *m)
{
    const ProtobufCFieldDescriptor fd = {.type = PROTOBUF_C_TYPE_MESSAGE};
    print_line(pb_value_json(&fd, &m));
}

static cJSON *logprob_json(const folio_logprob_t *l)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "token", l->token);
    cJSON_AddNumberToObject(o, "logprob", l->logprob);
    return o;
}

void cli_json_print_result(const folio_result_t *r, bool final)
{
    const folio_result_t *fin = final ? r : NULL;
    cJSON *j = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(j, "tokens");
    for (int i = 0; i < r->n_tokens; i++) cJSON_AddItemToArray(toks, cJSON_CreateNumber(r->tokens[i]));
    cJSON_AddStringToObject(j, "text", r->text ? r->text : "");
    const bool ok = fin && fin->status == FOLIO__V1__STATUS_CODE__OK;
    int reason = fin ? fin->finish_reason : FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    if (reason == FOLIO__V1__FINISH_REASON__FINISH_NONE) reason = FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    if (fin && !ok && reason == FOLIO__V1__FINISH_REASON__FINISH_ERROR &&
        (fin->status == FOLIO__V1__STATUS_CODE__CANCELLED || fin->status == FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED))
        reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
    cJSON_AddStringToObject(j, "finish_reason", wire_finish_name(reason));
    cJSON_AddStringToObject(j, "status", fin ? wire_status_name(fin->status) : "UNAVAILABLE");
    if (fin && !ok) cJSON_AddStringToObject(j, "message", fin->message);
    cJSON *u = cJSON_AddObjectToObject(j, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", fin ? fin->prompt_tokens : 0);
    cJSON_AddNumberToObject(u, "cached_prompt_tokens", fin ? fin->cached_prompt_tokens : 0);
    cJSON_AddNumberToObject(u, "completion_tokens",
                            fin && fin->completion_tokens ? fin->completion_tokens : (unsigned)r->n_tokens);
    cJSON_AddNumberToObject(u, "drafted_tokens", fin ? fin->drafted_tokens : 0);
    cJSON_AddNumberToObject(u, "accepted_tokens", fin ? fin->accepted_tokens : 0);
    cJSON *t = cJSON_AddObjectToObject(j, "timings");
    cJSON_AddNumberToObject(t, "queued_ms", fin ? fin->queued_s * 1e3 : 0);
    cJSON_AddNumberToObject(t, "first_token_ms", fin ? fin->first_token_s * 1e3 : 0);
    cJSON_AddNumberToObject(t, "total_ms", fin ? fin->total_s * 1e3 : 0);
    cJSON_AddStringToObject(j, "group", fin ? fin->group : "");
    if (r->n_logprobs > 0) {
        cJSON *a = cJSON_AddArrayToObject(j, "logprobs");
        for (int i = 0; i < r->n_logprobs; i++) {
            cJSON *e = logprob_json(&r->logprobs[i].chosen);
            cJSON *top = cJSON_AddArrayToObject(e, "top");
            for (int k = 0; k < r->logprobs[i].n_top; k++) cJSON_AddItemToArray(top, logprob_json(&r->logprobs[i].top[k]));
            cJSON_AddItemToArray(a, e);
        }
    }
    print_line(j);
}
