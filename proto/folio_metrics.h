/* The cluster's figures in the Prometheus text exposition format (version 0.0.4).
 *
 * One renderer, fed by the coordinator's Status reply, so that `/metrics` on the HTTP gateway,
 * `folioctl metrics` and `folioctl status` all report the same counters. Names follow vLLM's where
 * the meaning is the same, with the prefix "folio:" (e.g. folio:time_to_first_token_seconds,
 * folio:num_requests_running{group="g0"}); README.md ("Metrics") lists them all. Per-group series
 * carry group="NAME" (escaped, invalid UTF-8 replaced); the coordinator's own series and those of
 * requests no group served carry none. Part of libfolio-client (proto/folio_metrics.c). */
#ifndef FOLIO_METRICS_H
#define FOLIO_METRICS_H

#include "folio.pb-c.h"

/* The text for status (borrowed, not changed): a malloc'd NUL-terminated string whose every line
 * ends in '\n', for the caller to free; NULL when out of memory. Serve it as
 * "text/plain; version=0.0.4; charset=utf-8". */
char *folio_metrics_render(const Folio__V1__StatusReply *status);

#endif
