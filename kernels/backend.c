/* backend.c - backend-independent entry points of kernels.h: kern_destroy, and the CUDA constructors.
 *
 * The CUDA backend is a loadable module (libfolio_cuda.so, built whenever nvcc is found), opened with
 * dlopen on first use, as llama.cpp loads its GPU backends. A CPU-only process therefore never maps
 * the CUDA runtime or cuBLASLt (about 50 MiB resident for cuBLASLt alone), and one binary serves
 * machines with and without a GPU. The module is looked for in $FOLIO_CUDA_MODULE, next to the
 * executable, in its parent directory and ../lib, then on the loader's path. */
#include "kernels.h"

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
