/* The cluster's figures in the Prometheus text exposition format (version 0.0.4).
 *
 * One renderer, fed by the coordinator's Status reply, so that `/metrics` on the HTTP gateway,
 * `folioctl metrics` and `folioctl status` all report the same counters. Names follow vLLM's where
 * the meaning is the same, with the prefix "folio:" (e.g. folio:time_to_first_token_seconds,
 * folio:num_requests_running{group="g0"}). */
#ifndef FOLIO_METRICS_H
#define FOLIO_METRICS_H

#include "folio.pb-c.h"

/* Returns a malloc'd NUL-terminated text (every line ends in '\n'), NULL when out of memory. */
char *folio_metrics_render(const Folio__V1__StatusReply *status);

#endif
