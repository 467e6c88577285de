/* bandwidth.cu - the device's measured copy bandwidth, the denominator of folio-bench's roofline.
 *
 * A device-to-device cudaMemcpy of a buffer far larger than L2 reads and writes every byte once, so
 * (2 x bytes) / time is what the memory system sustains for streaming traffic: the ceiling a decode
 * step, which streams the weights and the KV cache, can approach. Best of several timed copies after
 * a warm-up, timed with events on a private stream. */
#include <cuda_runtime.h>

#include "kernels.h"

#define BW_CHECK(call)                                                                                     \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess) {                                                                           \
            rc = fl_fail(err, FL_EBACKEND, "copy bandwidth: %s: %s", #call, cudaGetErrorString(e_));       \
            goto done;                                                                                     \
        }                                                                                                  \
    } while (0)

extern "C" int kern_cuda_module_copy_bandwidth(int device, size_t bytes, double *bytes_per_s, fl_error_t *err)
{
    int rc = 0;
    void *src = NULL, *dst = NULL;
    cudaStream_t stream = NULL;
    cudaEvent_t start = NULL, stop = NULL;
    double best = 0;
    BW_CHECK(cudaSetDevice(device));
    BW_CHECK(cudaMalloc(&src, bytes));
    BW_CHECK(cudaMalloc(&dst, bytes));
    BW_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    BW_CHECK(cudaEventCreate(&start));
    BW_CHECK(cudaEventCreate(&stop));
    BW_CHECK(cudaMemsetAsync(src, 1, bytes, stream));
    BW_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)); /* warm-up */
    for (int i = 0; i < 10; i++) {
        BW_CHECK(cudaEventRecord(start, stream));
        BW_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
        BW_CHECK(cudaEventRecord(stop, stream));
        BW_CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        BW_CHECK(cudaEventElapsedTime(&ms, start, stop));
        const double rate = 2.0 * (double)bytes / (ms * 1e-3);
        if (ms > 0 && rate > best) best = rate;
    }
    *bytes_per_s = best;
done:
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (stream) cudaStreamDestroy(stream);
    cudaFree(src);
    cudaFree(dst);
    return rc;
}
