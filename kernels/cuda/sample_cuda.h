/* sample_cuda.h - the device side of kernels/sampling.h's draw (sample_cuda.cu), for cuda_sampling.cu. */
#ifndef FOLIO_SAMPLE_CUDA_H
#define FOLIO_SAMPLE_CUDA_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* One row's parameters, prepared on the host (the uniform draw u included). */
typedef struct cuda_sample_row {
    double u;       /* kern_sample_uniform(seed, position) */
    float inv_t;    /* 1 / temperature, rounded as the CPU rounds it */
    float top_p;
    int top_k;
    int active;     /* 0: the row is greedy; its id is the argmax kernel's and is left alone */
    unsigned long long min_w; /* kern_sample_min_weight(min_p): 0 off */
} cuda_sample_row_t;

/* The logit adjustments of one call, packed on the host and copied to the device in one transfer.
 * Zeroed: empty; its buffers grow (rarely) to the largest call seen. */
typedef struct cuda_sample_adjust {
    struct cuda_adjust_entry *h, *d; /* host staging, device */
    size_t cap;                      /* entries each holds */
} cuda_sample_adjust_t;

/* Applies every row's params[i].adjust to logits [n][vocab] (device memory) in place, on stream;
 * returns at once when no row has any. Call before the argmax: greedy rows see adjusted logits. */
cudaError_t cuda_sample_adjust(cuda_sample_adjust_t *a, float *logits, int n, int vocab,
                               const kern_sampling_t *params, cudaStream_t stream);
void cuda_sample_adjust_free(cuda_sample_adjust_t *a);

/* The allowed-token masks of one call (kern_sampling_t.allowed), staged like the adjustments. */
typedef struct cuda_sample_mask {
    uint64_t *h, *d;    /* host staging, device: [rows with a mask][words] */
    int32_t *h_row, *d_row; /* each staged mask's row */
    size_t cap_words, cap_rows;
} cuda_sample_mask_t;

/* Sets -INFINITY in every row with params[i].allowed for the tokens whose bit is clear, on stream;
 * returns at once when no row has a mask. Call before cuda_sample_adjust. */
cudaError_t cuda_sample_mask(cuda_sample_mask_t *m, float *logits, int n, int vocab, const kern_sampling_t *params,
                             cudaStream_t stream);
void cuda_sample_mask_free(cuda_sample_mask_t *m);

/* Draws a token for every active row of logits [n][vocab] into out[n] (device memory); rows whose
 * maximum logit is not finite are left alone too (the argmax stands, as on the CPU). */
cudaError_t cuda_sample_launch(const float *logits, int n, int vocab, const cuda_sample_row_t *rows, int32_t *out,
                               cudaStream_t stream);

#endif
