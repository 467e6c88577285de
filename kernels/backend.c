/* backend.c - backend-independent entry points of kernels.h: kern_destroy, and the CUDA constructors
 * when folio is built without CUDA (the CUDA build defines them in kernels/cuda/). */
#include "kernels.h"

#include <stddef.h>

void kern_destroy(kern_backend_t **bep)
{
    if (!bep || !*bep) return;
    (*bep)->ops->destroy(*bep);
    *bep = NULL;
}

#ifndef FOLIO_HAVE_CUDA
kern_backend_t *kern_cuda_new(int device, fl_error_t *err)
{
    fl_fail(err, FL_EUNSUPPORTED, "CUDA backend requested for device %d, but folio was built without CUDA", device);
    return NULL;
}

bool kern_cuda_available(void) { return false; }
#endif
