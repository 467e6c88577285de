/* sample_cuda.h - the device side of kernels/sampling.h's draw (sample_cuda.cu), for backend_cuda.cu. */
#ifndef FOLIO_SAMPLE_CUDA_H
#define FOLIO_SAMPLE_CUDA_H

#include <cuda_runtime.h>
#include <stdint.h>

/* One row's parameters, prepared on the host (the uniform draw u included). */
typedef struct cuda_sample_row {
    double u;       /* kern_sample_uniform(seed, position) */
    float inv_t;    /* 1 / temperature, rounded as the CPU rounds it */
    float top_p;
    int top_k;
    int active;     /* 0: the row is greedy; its id is the argmax kernel's and is left alone */
} cuda_sample_row_t;

/* Draws a token for every active row of logits [n][vocab] into out[n] (device memory); rows whose
 * maximum logit is not finite are left alone too (the argmax stands, as on the CPU). */
cudaError_t cuda_sample_launch(const float *logits, int n, int vocab, const cuda_sample_row_t *rows, int32_t *out,
                               cudaStream_t stream);

#endif
