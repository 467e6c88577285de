/* error.c - see error.h. */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>

int fl_fail(fl_error_t *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

const char *fl_strerror(int code)
{
    switch (code) {
    case FL_OK: return "FL_OK";
    case FL_EINVAL: return "FL_EINVAL";
    case FL_EIO: return "FL_EIO";
    case FL_EFORMAT: return "FL_EFORMAT";
    case FL_ENOMEM: return "FL_ENOMEM";
    case FL_EUNSUPPORTED: return "FL_EUNSUPPORTED";
    case FL_ERANGE: return "FL_ERANGE";
    case FL_ENOTFOUND: return "FL_ENOTFOUND";
    case FL_EBACKEND: return "FL_EBACKEND";
    case FL_EBUSY: return "FL_EBUSY";
    case FL_EPEER: return "FL_EPEER";
    default: return "FL_E?";
    }
}
