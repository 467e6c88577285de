/* cli_json.h - folioctl's JSON output: any protobuf-c message (status --json, health --json) and a
 * remote generation's result (generate --json, DESIGN.md's contract), one object on one line of
 * stdout. */
#ifndef FOLIO_CLI_JSON_H
#define FOLIO_CLI_JSON_H

#include <stdbool.h>

#include "folio_client.h"

/* m with its proto field names (snake_case) as keys, every field present (defaults included), enums
 * by name, repeated fields as arrays. */
void cli_json_print_pb(const ProtobufCMessage *m);
/* tokens, text, finish_reason, status (and message when not OK), usage, timings, group, and
 * logprobs when the request asked for them. final false: no final arrived (status UNAVAILABLE,
 * finish reason error, usage and timings what is known). */
void cli_json_print_result(const folio_result_t *r, bool final);

#endif
