/* test_cuda_backend.c - the CUDA backend against the CPU backend (label gpu).
 *
 * Where no usable CUDA backend is present it reports itself skipped (exit 77, ctest's
 * SKIP_RETURN_CODE) with the reason, never passed or failed. Today the CUDA module is a skeleton
 * (device probe and error checking only; the kernel table is the CUDA backend issue), so on a GPU
 * machine this test also skips, saying so. When the kernels land, this file compares every op with
 * the CPU backend as llama.cpp's test-backend-ops does. */
#include <stdio.h>

#include "kernels.h"

int main(void)
{
    fl_error_t err = {0};
    if (!kern_cuda_available()) {
        kern_backend_t *be = kern_cuda_new(0, &err);
        if (be) kern_destroy(&be);
        printf("SKIPPED: no usable CUDA backend: %s\n", err.msg[0] ? err.msg : "not available");
        return 77;
    }
    kern_backend_t *be = kern_cuda_new(0, &err);
    if (!be) {
        printf("FAIL: CUDA reported available but kern_cuda_new failed: %s\n", err.msg);
        return 1;
    }
    kern_destroy(&be);
    printf("CUDA backend created\n");
    return 0;
}
