/* backend_cuda.cu - the CUDA backend's entry points (skeleton).
 *
 * This is the frame the CUDA backend issue fills: device discovery, one checking macro for CUDA
 * runtime and cuBLASLt calls that turns a failure into a folio error naming the call, and the
 * constructor the engine reaches through kernels/backend.c (dlopen of this module) for --backend cuda. The kernel table itself is not implemented yet,
 * so kern_cuda_module_new() reports FL_EUNSUPPORTED after checking the device, and the module's availability
 * answers false: "auto" picks the CPU backend until the CUDA kernels exist. It compiles and links
 * in every build with nvcc so CUDA build breaks show up in CI. */
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stdio.h>

#include "kernels.h"

/* One check for every CUDA runtime call: a failure becomes an fl_error_t naming the call. */
#define CUDA_CHECK(call, err)                                                                              \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess)                                                                             \
            return fl_fail((err), FL_EBACKEND, "%s:%d: %s: %s", __FILE__, __LINE__, #call,                 \
                           cudaGetErrorString(e_));                                                        \
    } while (0)

#define CUBLAS_CHECK(call, err)                                                                            \
    do {                                                                                                   \
        cublasStatus_t s_ = (call);                                                                        \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            return fl_fail((err), FL_EBACKEND, "%s:%d: %s: cuBLAS status %d", __FILE__, __LINE__, #call,   \
                           (int)s_);                                                                       \
    } while (0)

static int probe_device(int device, fl_error_t *err)
{
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count), err);
    if (device < 0 || device >= count)
        return fl_fail(err, FL_ENOTFOUND, "CUDA device %d not present (%d devices)", device, count);
    CUDA_CHECK(cudaSetDevice(device), err);
    cublasLtHandle_t lt;
    CUBLAS_CHECK(cublasLtCreate(&lt), err);
    cublasLtDestroy(lt);
    return FL_OK;
}

extern "C" bool kern_cuda_module_available(void)
{
    /* False until the kernel table below exists, so the engine's "auto" stays on the CPU. */
    return false;
}

extern "C" kern_backend_t *kern_cuda_module_new(int device, fl_error_t *err)
{
    if (probe_device(device, err)) return NULL;
    fl_fail(err, FL_EUNSUPPORTED, "CUDA device %d found, but the CUDA kernels are not implemented yet; use --backend cpu",
            device);
    return NULL;
}
