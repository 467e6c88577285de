/* host_port.h - "[ADDR:]PORT" as the HTTP flags spell a listening address (folio-gateway --http,
 * folioctl up --http), parsed one way for the server and for the tools that reach it. */
#ifndef FOLIO_HOST_PORT_H
#define FOLIO_HOST_PORT_H

#include <stddef.h>

/* "8080", "0.0.0.0:8080", "localhost:8080", "[::1]:8080": host gets the address without brackets
 * ("" when none is given), port the number. 0, or FL_EINVAL for anything else (a port outside
 * 1..65535, an unclosed bracket, an IPv6 address without brackets, a host longer than cap - 1). */
int fl_host_port_parse(const char *s, char *host, size_t cap, int *port);

/* The host a client on this machine connects to for a listening host: "", 0.0.0.0 -> 127.0.0.1,
 * :: -> ::1, others as they are. Borrowed (host itself or a constant). */
const char *fl_host_port_local(const char *host);

#endif
