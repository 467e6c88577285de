/* host_port.c - see host_port.h. */
#include "host_port.h"

#include <stdlib.h>
#include <string.h>

#include "error.h"

int fl_host_port_parse(const char *s, char *host, size_t cap, int *port)
{
    if (!s || !*s || !cap) return FL_EINVAL;
    const char *p = s;
    host[0] = 0;
    if (*s == '[') { /* [v6]:port */
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':' || (size_t)(close - s - 1) >= cap) return FL_EINVAL;
        memcpy(host, s + 1, (size_t)(close - s - 1));
        host[close - s - 1] = 0;
        p = close + 2;
    } else if (strchr(s, ':')) {
        const char *colon = strchr(s, ':');
        if ((size_t)(colon - s) >= cap || strchr(colon + 1, ':')) return FL_EINVAL;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = 0;
        p = colon + 1;
    }
    char *end;
    const long v = strtol(p, &end, 10);
    if (end == p || *end || *p == '+' || *p == '-' || v < 1 || v > 65535) return FL_EINVAL;
    *port = (int)v;
    return FL_OK;
}

const char *fl_host_port_local(const char *host)
{
    if (!host || !*host || !strcmp(host, "0.0.0.0")) return "127.0.0.1";
    if (!strcmp(host, "::")) return "::1";
    return host;
}
