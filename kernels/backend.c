/* backend.c - backend-independent entry points of kernels.h: the kern_* calls, which dispatch through
 * the backend's ops table (backend_internal.h), and the CUDA constructors.
 *
 * A fused op the backend leaves out runs as the plain ops it stands for, so the model is written once
 * against the fused calls. Each call costs a plain function call on top of the table's: nothing next
 * to an op's work.
 *
 * The CUDA backend is a loadable module (libfolio_cuda.so, built whenever nvcc is found), opened with
 * dlopen on first use, as llama.cpp loads its GPU backends. A CPU-only process therefore never maps
 * the CUDA runtime or cuBLASLt (about 50 MiB resident for cuBLASLt alone), and one binary serves
 * machines with and without a GPU. The module is looked for in $FOLIO_CUDA_MODULE, next to the
 * executable, in its parent directory and ../lib, then on the loader's path. */
#include "backend_internal.h"
#include "kern_nccl.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void kern_destroy(kern_backend_t **bep)
{
    if (!bep || !*bep) return;
    (*bep)->ops->destroy(*bep);
    *bep = NULL;
}

const char *kern_backend_name(const kern_backend_t *be) { return be->ops->name; }
bool kern_uses_device_memory(const kern_backend_t *be) { return be->ops->device_memory; }
float kern_attention_cost(const kern_backend_t *be) { return be->ops->attention_cost > 0 ? be->ops->attention_cost : 1.0f; }

int kern_mem_info(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes)
{
    return be->ops->mem_info ? be->ops->mem_info(be, free_bytes, total_bytes) : FL_EUNSUPPORTED;
}

void *kern_alloc(kern_backend_t *be, size_t n) { return be->ops->alloc(be, n); }
void kern_free(kern_backend_t *be, void *p) { be->ops->free(be, p); }
int kern_upload(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return be->ops->upload(be, dst, src, bytes);
}
int kern_download(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return be->ops->download(be, dst, src, bytes);
}
int kern_sync(kern_backend_t *be, fl_error_t *err) { return be->ops->sync(be, err); }

kern_weight_t *kern_weight_new(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                               fl_error_t *err)
{
    return be->ops->weight_new(be, type, rows, cols, data, err);
}
void kern_weight_destroy(kern_backend_t *be, kern_weight_t *w)
{
    if (w) be->ops->weight_destroy(be, w);
}

void kern_embed(kern_backend_t *be, float *o, const kern_weight_t *t, const int32_t *ids, int n)
{
    be->ops->embed(be, o, t, ids, n);
}
void kern_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n)
{
    be->ops->matmul(be, y, w, x, n);
}
void kern_set_prompt_rows(kern_backend_t *be, const uint8_t *prompt_rows, int n)
{
    if (be->ops->set_prompt_rows) be->ops->set_prompt_rows(be, prompt_rows, n);
}
void kern_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                       int n)
{
    if (be->ops->matmul_multi) be->ops->matmul_multi(be, ys, ws, n_w, x, n);
    else
        for (int k = 0; k < n_w; k++) be->ops->matmul(be, ys[k], ws[k], x, n);
}
void kern_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *w, int n, int dim, float eps)
{
    be->ops->rmsnorm(be, y, x, w, n, dim, eps);
}
void kern_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int nh, int hd, const kern_rope_t *r)
{
    be->ops->rope(be, x, pos, n, nh, hd, r);
}
void kern_kv_store(kern_backend_t *be, void *kc, void *vc, int kt, int vt, const float *k, const float *v,
                   const int32_t *slots, int n, int kv_dim)
{
    be->ops->kv_store(be, kc, vc, kt, vt, k, v, slots, n, kv_dim);
}
void kern_kv_move(kern_backend_t *be, void *kc, void *vc, int kt, int vt, const int32_t *src_slots,
                  const int32_t *dst_slots, int n, int kv_dim)
{
    if (n > 0) be->ops->kv_move(be, kc, vc, kt, vt, src_slots, dst_slots, n, kv_dim);
}
void kern_attention(kern_backend_t *be, const kern_attn_t *a) { be->ops->attention(be, a); }
void kern_swiglu(kern_backend_t *be, float *o, const float *g, const float *u, int n)
{
    be->ops->swiglu(be, o, g, u, n);
}
void kern_add(kern_backend_t *be, float *y, const float *x, int n) { be->ops->add(be, y, x, n); }
void kern_add_bias(kern_backend_t *be, float *y, const float *bias, int n, int dim)
{
    be->ops->add_bias(be, y, bias, n, dim);
}
void kern_scale(kern_backend_t *be, float *x, float s, int n) { be->ops->scale(be, x, s, n); }
void kern_softcap(kern_backend_t *be, float *x, float cap, int n) { be->ops->softcap(be, x, cap, n); }
void kern_geglu(kern_backend_t *be, float *o, const float *g, const float *u, int n)
{
    be->ops->geglu(be, o, g, u, n);
}
void kern_sample(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab, const kern_sampling_t *p)
{
    be->ops->sample(be, out, logits, n, vocab, p);
}

bool kern_has_matmul_rows(const kern_backend_t *be) { return be->ops->matmul_rows != NULL; }

bool kern_matmul_rows(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n,
                      const int32_t *const *ids, const int32_t *n_ids)
{
    if (!kern_has_matmul_rows(be)) return false;
    be->ops->matmul_rows(be, y, w, x, n, ids, n_ids);
    return true;
}

void kern_add_rmsnorm(kern_backend_t *be, float *y, float *x, const float *delta, const float *w, int n, int dim,
                      float eps)
{
    if (be->ops->add_rmsnorm) {
        be->ops->add_rmsnorm(be, y, x, delta, w, n, dim, eps);
        return;
    }
    be->ops->add(be, x, delta, n * dim);
    be->ops->rmsnorm(be, y, x, w, n, dim, eps);
}
void kern_rope_kv_store(kern_backend_t *be, float *q, float *k, const float *v, void *kc, void *vc, int kt, int vt,
                        const int32_t *pos, const int32_t *slots, int n, int nh, int nkv, int hd, const kern_rope_t *r)
{
    if (be->ops->rope_kv_store) {
        be->ops->rope_kv_store(be, q, k, v, kc, vc, kt, vt, pos, slots, n, nh, nkv, hd, r);
        return;
    }
    be->ops->rope(be, q, pos, n, nh, hd, r);
    be->ops->rope(be, k, pos, n, nkv, hd, r);
    be->ops->kv_store(be, kc, vc, kt, vt, k, v, slots, n, nkv * hd);
}
void kern_matmul_swiglu(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
                        const kern_weight_t *w_up, int rows, const float *x, int n)
{
    if (be->ops->matmul_swiglu) {
        be->ops->matmul_swiglu(be, out, up, w_gate, w_up, rows, x, n);
        return;
    }
    float *const ys[2] = {out, up};
    const kern_weight_t *const ws[2] = {w_gate, w_up};
    kern_matmul_multi(be, ys, ws, 2, x, n);
    be->ops->swiglu(be, out, out, up, n * rows);
}

int kern_graph_begin(kern_backend_t *be, uint64_t key)
{
    return be->ops->graph_begin ? be->ops->graph_begin(be, key) : 0;
}
int kern_graph_end(kern_backend_t *be) { return be->ops->graph_end ? be->ops->graph_end(be) : 0; }
void kern_graph_reset(kern_backend_t *be)
{
    if (be->ops->graph_reset) be->ops->graph_reset(be);
}

typedef kern_backend_t *(*cuda_new_fn)(int device, fl_error_t *err);
typedef bool (*cuda_available_fn)(void);
typedef int (*cuda_bandwidth_fn)(int device, size_t bytes, double *bytes_per_s, fl_error_t *err);

static void *g_cuda_module;
static char g_cuda_error[512];
static pthread_once_t g_cuda_once = PTHREAD_ONCE_INIT;

static void *try_open(const char *path)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        /* Keep the most telling failure: a module that exists but cannot load beats "not found". */
        if (e && (!g_cuda_error[0] || !strstr(e, "No such file"))) snprintf(g_cuda_error, sizeof g_cuda_error, "%s", e);
    }
    return h;
}

static void load_cuda_module(void)
{
    const char *name = "libfolio_cuda.so";
    const char *env = getenv("FOLIO_CUDA_MODULE");
    if (env && *env && (g_cuda_module = try_open(env))) return;
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        const char *rel[] = {"", "/..", "/../lib"};
        for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
            char path[PATH_MAX + 64];
            snprintf(path, sizeof path, "%s%s/%s", exe, rel[i], name);
            if (access(path, R_OK) == 0 && (g_cuda_module = try_open(path))) return;
        }
    }
    g_cuda_module = try_open(name);
}

static void *cuda_symbol(const char *sym)
{
    pthread_once(&g_cuda_once, load_cuda_module);
    return g_cuda_module ? dlsym(g_cuda_module, sym) : NULL;
}

kern_backend_t *kern_cuda_new(int device, fl_error_t *err)
{
    cuda_new_fn fn = (cuda_new_fn)cuda_symbol("kern_cuda_module_new");
    if (!fn) {
        fl_fail(err, FL_EUNSUPPORTED, "CUDA backend unavailable for device %d: %s", device,
                g_cuda_error[0] ? g_cuda_error : "libfolio_cuda.so not found (folio built without CUDA?)");
        return NULL;
    }
    return fn(device, err);
}

const char *kern_cuda_module_error(void)
{
    pthread_once(&g_cuda_once, load_cuda_module);
    return g_cuda_module ? NULL : g_cuda_error[0] ? g_cuda_error : "libfolio_cuda.so not found";
}

bool kern_cuda_available(void)
{
    /* No NVIDIA driver, no GPU: don't load the module (and the CUDA libraries) just to ask. */
    if (access("/dev/nvidiactl", F_OK) != 0 && access("/proc/driver/nvidia/version", F_OK) != 0) return false;
    cuda_available_fn fn = (cuda_available_fn)cuda_symbol("kern_cuda_module_available");
    return fn && fn();
}

int kern_cuda_copy_bandwidth(int device, size_t bytes, double *bytes_per_s, fl_error_t *err)
{
    cuda_bandwidth_fn fn = (cuda_bandwidth_fn)cuda_symbol("kern_cuda_module_copy_bandwidth");
    if (!fn)
        return fl_fail(err, FL_EUNSUPPORTED, "CUDA backend unavailable: %s",
                       g_cuda_error[0] ? g_cuda_error : "libfolio_cuda.so not found (folio built without CUDA?)");
    return fn(device, bytes, bytes_per_s, err);
}

/* NCCL (kern_nccl.h): the CUDA module's communicators, found like its backend. */
#define NCCL_FN(type, sym, ...)                                                                                        \
    type fn = (type)cuda_symbol(sym);                                                                                  \
    if (!fn)                                                                                                           \
        return fl_fail(err, FL_EUNSUPPORTED, "NCCL unavailable: %s",                                                   \
                       g_cuda_error[0] ? g_cuda_error : "libfolio_cuda.so not found or built without NCCL");           \
    return fn(__VA_ARGS__)

int kern_nccl_id(uint8_t id[KERN_NCCL_ID_BYTES], fl_error_t *err)
{
    typedef int (*fn_t)(uint8_t *, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_id", id, err);
}

kern_nccl_t *kern_nccl_init(kern_backend_t *be, const uint8_t id[KERN_NCCL_ID_BYTES], int rank, int n_ranks,
                            int timeout_ms, fl_error_t *err)
{
    typedef kern_nccl_t *(*fn_t)(kern_backend_t *, const uint8_t *, int, int, int, fl_error_t *);
    fn_t fn = (fn_t)cuda_symbol("kern_cuda_module_nccl_init");
    if (!fn || !be->ops->device_memory) {
        fl_fail(err, FL_EUNSUPPORTED, "NCCL needs the CUDA backend (this one is %s)%s", be->ops->name,
                fn ? "" : " and a CUDA module built with NCCL");
        return NULL;
    }
    return fn(be, id, rank, n_ranks, timeout_ms, err);
}

int kern_nccl_allreduce_sum_f32(kern_nccl_t *c, float *dev_buf, size_t n, fl_error_t *err)
{
    typedef int (*fn_t)(kern_nccl_t *, float *, size_t, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_allreduce", c, dev_buf, n, err);
}

int kern_nccl_broadcast(kern_nccl_t *c, void *host_buf, size_t bytes, int root, fl_error_t *err)
{
    typedef int (*fn_t)(kern_nccl_t *, void *, size_t, int, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_broadcast", c, host_buf, bytes, root, err);
}

int kern_nccl_send(kern_nccl_t *c, const void *host_buf, size_t bytes, int peer, fl_error_t *err)
{
    typedef int (*fn_t)(kern_nccl_t *, const void *, size_t, int, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_send", c, host_buf, bytes, peer, err);
}

int kern_nccl_recv(kern_nccl_t *c, void *host_buf, size_t bytes, int peer, fl_error_t *err)
{
    typedef int (*fn_t)(kern_nccl_t *, void *, size_t, int, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_recv", c, host_buf, bytes, peer, err);
}

int kern_nccl_wait(kern_nccl_t *c, fl_error_t *err)
{
    typedef int (*fn_t)(kern_nccl_t *, fl_error_t *);
    NCCL_FN(fn_t, "kern_cuda_module_nccl_wait", c, err);
}

void kern_nccl_abort(kern_nccl_t *c)
{
    typedef void (*fn_t)(kern_nccl_t *);
    fn_t fn = (fn_t)cuda_symbol("kern_cuda_module_nccl_abort");
    if (fn && c) fn(c);
}

void kern_nccl_destroy(kern_nccl_t *c)
{
    typedef void (*fn_t)(kern_nccl_t *);
    fn_t fn = (fn_t)cuda_symbol("kern_cuda_module_nccl_destroy");
    if (fn && c) fn(c);
}
