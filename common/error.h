/* error.h - folio status codes and the error message a failing call leaves for its caller.
 *
 * Library code never prints or exits: it returns 0 or a negative FL_E* code and, when the caller
 * passed a non-NULL fl_error_t, writes a message naming the input and what was wrong. */
#ifndef FOLIO_ERROR_H
#define FOLIO_ERROR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    FL_OK = 0,
    FL_EINVAL = -1,       /* bad argument or input */
    FL_EIO = -2,          /* open/read/mmap failed */
    FL_EFORMAT = -3,      /* file or message is malformed */
    FL_ENOMEM = -4,       /* allocation failed */
    FL_EUNSUPPORTED = -5, /* valid but not supported (tensor type, architecture) */
    FL_ERANGE = -6,       /* a value or size is out of range, or a buffer is too small */
    FL_ENOTFOUND = -7,    /* key, tensor or device not found */
    FL_EBACKEND = -8,     /* CUDA / cuBLASLt / NCCL / OpenBLAS failure */
    FL_EBUSY = -9,        /* full for now (a queue, a pool): the same call may succeed later */
    FL_EPEER = -10,       /* a peer (another rank or group) is gone, timed out, aborted or disagrees */
};

typedef struct fl_error {
    int code;
    char msg[512];
} fl_error_t;

/* Records code and a printf-style message in err (if not NULL) and returns code, so call sites
 * read `return fl_fail(err, FL_EFORMAT, "%s: ...", path);`. */
int fl_fail(fl_error_t *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Short name of a code ("FL_EFORMAT"). */
const char *fl_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif
