/* Fused router attention: out = softmax(Q K^T * tau + mask_bias) V in one kernel launch.
See router_attention.h for layout, semantics and the C ABI.

Build the shared library (the one documented command; sm_90 SASS + compute_90 PTX):
    make -C kernels
Standalone validation against the CPU reference + timing, llm.c style (needs a GPU):
    make -C kernels check && kernels/build/router_attention_check

Design, for the CV router's shape (8 heads x head_dim 8 x 64 positions):
- Version 2, one thread per query row. A block is the 64 queries of one (batch, head); the
  head's K and V (64 x 8 each) are staged once in shared memory, converted to fp32, and
  every thread walks them: at head_dim 8 a warp-wide dot product would leave 24 of 32
  lanes idle, while a thread holds its q row and accumulator in 16 registers. All lanes
  read the same K/V row at a time, which shared memory serves as a broadcast.
- tau * log2(e) is folded into q once, so each score costs one exp2 (ex2.approx).
- Online softmax in chunks of 16 keys: one rescale of the accumulator per chunk instead
  of one per key, and no score matrix ever leaves registers.
- 16-byte vector loads/stores of q/k/v/out rows when the pointers allow it.
At batch 1024 the kernel reads and writes 4 x 1024 x 8 x 64 x 8 elements (16 MiB in fp16)
once: it is meant to run near the HBM bound, where SDPA launches several kernels.
- Version 1, one warp per query row (lanes split head_dim, shuffles reduce the dot), is
  the general path for the NLP router's head dims up to 128 and sequences up to 512.
*/
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "router_attention.h"

#define LOG2E 1.4426950408889634f

static thread_local char g_last_cuda_error[256] = "";

static int record_cuda_error(cudaError_t err) {
    snprintf(g_last_cuda_error, sizeof(g_last_cuda_error), "%s: %s", cudaGetErrorName(err),
             cudaGetErrorString(err));
    return MOQE_ATTN_CUDA_ERROR;
}

// ----------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// D contiguous elements at p -> dst (fp32); 16-byte loads when VEC (caller checked alignment)
template <typename T, int D, bool VEC>
__device__ __forceinline__ void load_row(const T *__restrict__ p, float *dst) {
    if constexpr (VEC) {
        constexpr int PER = 16 / sizeof(T);
#pragma unroll
        for (int c = 0; c < D / PER; c++) {
            uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p) + c);
            const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
            for (int u = 0; u < PER; u++) dst[c * PER + u] = to_f(e[u]);
        }
    } else {
#pragma unroll
        for (int d = 0; d < D; d++) dst[d] = to_f(p[d]);
    }
}

template <typename T, int D, bool VEC>
__device__ __forceinline__ void store_row(T *__restrict__ p, const float *src, float mul) {
    if constexpr (VEC) {
        constexpr int PER = 16 / sizeof(T);
#pragma unroll
        for (int c = 0; c < D / PER; c++) {
            uint4 raw;
            T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
            for (int u = 0; u < PER; u++) e[u] = from_f<T>(src[c * PER + u] * mul);
            reinterpret_cast<uint4 *>(p)[c] = raw;
        }
    } else {
#pragma unroll
        for (int d = 0; d < D; d++) p[d] = from_f<T>(src[d] * mul);
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ----------------------------------------------------------------------------
// version 1: one warp per query row, any head_dim <= 128

constexpr int V1_WARPS = 8;   // query rows per block
constexpr int V1_KTILE = 32;  // keys staged in shared memory at a time
constexpr int V1_PER_LANE = MOQE_ATTN_MAX_HEAD_DIM / 32;

template <typename T, bool MASK>
__global__ void __launch_bounds__(V1_WARPS * 32)
attn_warp_per_query(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                    T *__restrict__ out, const unsigned char *__restrict__ key_mask, int heads,
                    int seq, int D, float scale_log2) {
    __shared__ float ks[V1_KTILE * MOQE_ATTN_MAX_HEAD_DIM];
    __shared__ float vs[V1_KTILE * MOQE_ATTN_MAX_HEAD_DIM];
    __shared__ float bias[V1_KTILE];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int bh = blockIdx.x;
    const size_t base = (size_t)bh * seq * D;
    const int i = blockIdx.y * V1_WARPS + w;
    const bool active = i < seq;
    const unsigned char *mrow = MASK ? key_mask + (size_t)(bh / heads) * seq : nullptr;

    float qr[V1_PER_LANE], acc[V1_PER_LANE];
#pragma unroll
    for (int r = 0; r < V1_PER_LANE; r++) {
        const int d = lane + 32 * r;
        qr[r] = (active && d < D) ? to_f(q[base + (size_t)i * D + d]) * scale_log2 : 0.f;
        acc[r] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int t0 = 0; t0 < seq; t0 += V1_KTILE) {
        const int n = min(V1_KTILE, seq - t0);
        __syncthreads();  // the previous tile is consumed
        // rows t0..t0+n of one head are contiguous: a coalesced copy of n*D elements
        for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
            ks[e] = to_f(k[base + (size_t)t0 * D + e]);
            vs[e] = to_f(v[base + (size_t)t0 * D + e]);
        }
        if (MASK && threadIdx.x < n)
            bias[threadIdx.x] = mrow[t0 + threadIdx.x] ? 0.f : MOQE_ATTN_MASK_BIAS * LOG2E;
        __syncthreads();
        for (int j = 0; j < n; j++) {
            float part = 0.f;
#pragma unroll
            for (int r = 0; r < V1_PER_LANE; r++) {
                const int d = lane + 32 * r;
                if (d < D) part = fmaf(qr[r], ks[j * D + d], part);
            }
            float s = warp_sum(part);
            if (MASK) s += bias[j];
            if (s > m) {  // warp-uniform: s is the reduced value
                const float corr = fast_exp2(m - s);
                l *= corr;
#pragma unroll
                for (int r = 0; r < V1_PER_LANE; r++) acc[r] *= corr;
                m = s;
            }
            const float p = fast_exp2(s - m);
            l += p;
#pragma unroll
            for (int r = 0; r < V1_PER_LANE; r++) {
                const int d = lane + 32 * r;
                if (d < D) acc[r] = fmaf(p, vs[j * D + d], acc[r]);
            }
        }
    }
    if (active) {
        const float inv = 1.f / l;
#pragma unroll
        for (int r = 0; r < V1_PER_LANE; r++) {
            const int d = lane + 32 * r;
            if (d < D) out[base + (size_t)i * D + d] = from_f<T>(acc[r] * inv);
        }
    }
}

// ----------------------------------------------------------------------------
// version 2: one thread per query row, head_dim 8/16/32, K/V tiles in shared memory

constexpr int V2_BLOCK = 64;  // query rows per block = keys per shared tile
constexpr int V2_CHUNK = 16;  // keys per online-softmax rescale

template <typename T, int D, bool VEC, bool MASK>
__global__ void __launch_bounds__(V2_BLOCK)
attn_thread_per_query(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                      T *__restrict__ out, const unsigned char *__restrict__ key_mask, int heads,
                      int seq, float scale_log2) {
    __shared__ __align__(16) float ks[V2_BLOCK * D];
    __shared__ __align__(16) float vs[V2_BLOCK * D];
    __shared__ float bias[V2_BLOCK];
    const int bh = blockIdx.x;
    const size_t base = (size_t)bh * seq * D;
    const int i = blockIdx.y * V2_BLOCK + threadIdx.x;
    const bool active = i < seq;
    const unsigned char *mrow = MASK ? key_mask + (size_t)(bh / heads) * seq : nullptr;

    float qr[D], acc[D];
    if (active) {
        load_row<T, D, VEC>(q + base + (size_t)i * D, qr);
#pragma unroll
        for (int d = 0; d < D; d++) qr[d] *= scale_log2;
    } else {
#pragma unroll
        for (int d = 0; d < D; d++) qr[d] = 0.f;
    }
#pragma unroll
    for (int d = 0; d < D; d++) acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;

    for (int t0 = 0; t0 < seq; t0 += V2_BLOCK) {
        const int n = min(V2_BLOCK, seq - t0);
        __syncthreads();
        {
            const int j = threadIdx.x;
            float kr[D], vr[D];
            if (j < n) {
                load_row<T, D, VEC>(k + base + (size_t)(t0 + j) * D, kr);
                load_row<T, D, VEC>(v + base + (size_t)(t0 + j) * D, vr);
            } else {  // zeros, not stale data: p = 0 times a stale inf would be NaN
#pragma unroll
                for (int d = 0; d < D; d++) kr[d] = vr[d] = 0.f;
            }
#pragma unroll
            for (int d = 0; d < D; d += 4) {
                *reinterpret_cast<float4 *>(&ks[j * D + d]) = make_float4(kr[d], kr[d + 1], kr[d + 2], kr[d + 3]);
                *reinterpret_cast<float4 *>(&vs[j * D + d]) = make_float4(vr[d], vr[d + 1], vr[d + 2], vr[d + 3]);
            }
            if (MASK) bias[j] = (j < n && !mrow[t0 + j]) ? MOQE_ATTN_MASK_BIAS * LOG2E : 0.f;
        }
        __syncthreads();
        for (int j0 = 0; j0 < n; j0 += V2_CHUNK) {
            float s[V2_CHUNK];
            float cm = -INFINITY;
#pragma unroll
            for (int c = 0; c < V2_CHUNK; c++) {
                const float *kr = &ks[(j0 + c) * D];
                float dot = 0.f;
#pragma unroll
                for (int d = 0; d < D; d++) dot = fmaf(qr[d], kr[d], dot);
                if (MASK) dot += bias[j0 + c];
                s[c] = (j0 + c < n) ? dot : -INFINITY;
                cm = fmaxf(cm, s[c]);
            }
            const float mn = fmaxf(m, cm);  // finite: key j0 < n is valid
            const float corr = fast_exp2(m - mn);
            l *= corr;
#pragma unroll
            for (int d = 0; d < D; d++) acc[d] *= corr;
#pragma unroll
            for (int c = 0; c < V2_CHUNK; c++) {
                const float p = fast_exp2(s[c] - mn);
                const float *vr = &vs[(j0 + c) * D];
                l += p;
#pragma unroll
                for (int d = 0; d < D; d++) acc[d] = fmaf(p, vr[d], acc[d]);
            }
            m = mn;
        }
    }
    if (active) store_row<T, D, VEC>(out + base + (size_t)i * D, acc, 1.f / l);
}

// ----------------------------------------------------------------------------
// host dispatch

static bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int D, bool VEC>
static void launch_v2(const T *q, const T *k, const T *v, T *out, const unsigned char *mask,
                      int bh, int heads, int seq, float scale_log2, cudaStream_t stream) {
    dim3 grid(bh, (seq + V2_BLOCK - 1) / V2_BLOCK);
    if (mask)
        attn_thread_per_query<T, D, VEC, true><<<grid, V2_BLOCK, 0, stream>>>(q, k, v, out, mask, heads, seq, scale_log2);
    else
        attn_thread_per_query<T, D, VEC, false><<<grid, V2_BLOCK, 0, stream>>>(q, k, v, out, mask, heads, seq, scale_log2);
}

template <typename T, int D>
static void launch_v2_d(const T *q, const T *k, const T *v, T *out, const unsigned char *mask,
                        int bh, int heads, int seq, float scale_log2, cudaStream_t stream) {
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(out) && (D * sizeof(T)) % 16 == 0;
    if (vec)
        launch_v2<T, D, true>(q, k, v, out, mask, bh, heads, seq, scale_log2, stream);
    else
        launch_v2<T, D, false>(q, k, v, out, mask, bh, heads, seq, scale_log2, stream);
}

static bool v2_supports(int head_dim) { return head_dim == 8 || head_dim == 16 || head_dim == 32; }

template <typename T>
static int launch(int version, const void *q_, const void *k_, const void *v_, void *out_,
                  const unsigned char *mask, int batch, int heads, int seq, int D, float tau,
                  cudaStream_t stream) {
    const T *q = static_cast<const T *>(q_), *k = static_cast<const T *>(k_), *v = static_cast<const T *>(v_);
    T *out = static_cast<T *>(out_);
    const int bh = batch * heads;
    const float scale_log2 = tau * LOG2E;
    if (version == MOQE_ATTN_AUTO) version = v2_supports(D) ? 2 : 1;
    if (version == 2) {
        if (!v2_supports(D)) return MOQE_ATTN_UNSUPPORTED;
        if (D == 8) launch_v2_d<T, 8>(q, k, v, out, mask, bh, heads, seq, scale_log2, stream);
        else if (D == 16) launch_v2_d<T, 16>(q, k, v, out, mask, bh, heads, seq, scale_log2, stream);
        else launch_v2_d<T, 32>(q, k, v, out, mask, bh, heads, seq, scale_log2, stream);
    } else if (version == 1) {
        dim3 grid(bh, (seq + V1_WARPS - 1) / V1_WARPS);
        if (mask)
            attn_warp_per_query<T, true><<<grid, V1_WARPS * 32, 0, stream>>>(q, k, v, out, mask, heads, seq, D, scale_log2);
        else
            attn_warp_per_query<T, false><<<grid, V1_WARPS * 32, 0, stream>>>(q, k, v, out, mask, heads, seq, D, scale_log2);
    } else {
        return MOQE_ATTN_UNSUPPORTED;
    }
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? MOQE_ATTN_OK : record_cuda_error(err);
}

extern "C" {

int moqe_attn_abi_version(void) { return MOQE_ATTN_ABI_VERSION; }

const char *moqe_attn_status_string(int status) {
    switch (status) {
        case MOQE_ATTN_OK: return "ok";
        case MOQE_ATTN_INVALID_ARGUMENT: return "invalid argument (NULL pointer, size < 1 or non-finite tau)";
        case MOQE_ATTN_UNSUPPORTED: return "unsupported head_dim, seq, dtype or kernel version";
        case MOQE_ATTN_CUDA_ERROR: return "CUDA error";
        default: return "unknown status";
    }
}

const char *moqe_attn_last_cuda_error(void) { return g_last_cuda_error; }

int moqe_router_attention_v(int version, const void *q, const void *k, const void *v, void *out,
                            const unsigned char *key_mask, int batch, int heads, int seq,
                            int head_dim, float tau, int dtype, cudaStream_t stream) {
    if (!q || !k || !v || !out) return MOQE_ATTN_INVALID_ARGUMENT;
    if (batch < 1 || heads < 1 || seq < 1 || head_dim < 1 || !isfinite(tau)) return MOQE_ATTN_INVALID_ARGUMENT;
    if ((long long)batch * heads > 0x7fffffffLL) return MOQE_ATTN_UNSUPPORTED;
    if (head_dim > MOQE_ATTN_MAX_HEAD_DIM || seq > MOQE_ATTN_MAX_SEQ) return MOQE_ATTN_UNSUPPORTED;
    if (dtype == MOQE_ATTN_FP32)
        return launch<float>(version, q, k, v, out, key_mask, batch, heads, seq, head_dim, tau, stream);
    if (dtype == MOQE_ATTN_FP16)
        return launch<__half>(version, q, k, v, out, key_mask, batch, heads, seq, head_dim, tau, stream);
    return MOQE_ATTN_UNSUPPORTED;
}

int moqe_router_attention(const void *q, const void *k, const void *v, void *out,
                          const unsigned char *key_mask, int batch, int heads, int seq, int head_dim,
                          float tau, int dtype, cudaStream_t stream) {
    return moqe_router_attention_v(MOQE_ATTN_AUTO, q, k, v, out, key_mask, batch, heads, seq, head_dim, tau,
                                   dtype, stream);
}

}  // extern "C"

// ----------------------------------------------------------------------------
// standalone check (llm.c pattern): every version vs the CPU reference, then timings

#ifdef MOQE_ATTN_STANDALONE
#include <stdlib.h>
#include <vector>

#define cudaCheck(call)                                                                               \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            fprintf(stderr, "[CUDA ERROR] at %s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
            exit(EXIT_FAILURE);                                                                       \
        }                                                                                             \
    } while (0)

static float frand(unsigned *s) {  // xorshift: reproducible inputs without <random>
    *s ^= *s << 13; *s ^= *s >> 17; *s ^= *s << 5;
    return (float)(*s & 0xffffff) / (float)0xffffff * 2.f - 1.f;
}

// max |gpu - cpu| over all elements; fails when above tol
static bool validate_result(const std::vector<float> &gpu, const std::vector<float> &cpu, float tol, const char *what) {
    double worst = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < cpu.size(); i++) {
        double d = fabs((double)gpu[i] - cpu[i]);
        if (!(d <= worst)) { worst = d; at = i; }
    }
    bool ok = worst <= tol;
    printf("  %-44s max abs err %.2e (at %zu: gpu %.6f cpu %.6f) %s\n", what, worst, at, gpu[at], cpu[at],
           ok ? "ok" : "FAIL");
    return ok;
}

struct Shape { int batch, heads, seq, dim; bool mask; };

int main(void) {
    int dev = 0;
    cudaCheck(cudaSetDevice(dev));
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    const Shape shapes[] = {{1, 8, 64, 8, false},  {3, 8, 64, 8, true},   {2, 8, 50, 8, false},
                            {2, 8, 130, 16, true}, {2, 4, 77, 32, false}, {2, 4, 512, 64, true},
                            {1, 4, 200, 128, true}, {2, 4, 33, 24, false}};
    bool all_ok = true;
    unsigned seed = 1234;
    for (const Shape &sh : shapes) {
        const size_t n = (size_t)sh.batch * sh.heads * sh.seq * sh.dim;
        std::vector<float> q(n), k(n), v(n), ref(n), got(n);
        std::vector<unsigned char> mask((size_t)sh.batch * sh.seq, 1);
        for (size_t i = 0; i < n; i++) { q[i] = frand(&seed); k[i] = frand(&seed); v[i] = frand(&seed); }
        if (sh.mask) for (size_t i = 0; i < mask.size(); i++) mask[i] = (i % sh.seq) < (size_t)(sh.seq * 3 / 4);
        const float tau = 1.7f / sqrtf((float)sh.dim);
        moqe_router_attention_ref(q.data(), k.data(), v.data(), ref.data(), sh.mask ? mask.data() : NULL, sh.batch,
                                  sh.heads, sh.seq, sh.dim, tau);
        float *dq, *dk, *dv, *dout;
        __half *hq, *hk, *hv, *hout;
        unsigned char *dmask;
        cudaCheck(cudaMalloc(&dq, n * 4)); cudaCheck(cudaMalloc(&dk, n * 4));
        cudaCheck(cudaMalloc(&dv, n * 4)); cudaCheck(cudaMalloc(&dout, n * 4));
        cudaCheck(cudaMalloc(&hq, n * 2)); cudaCheck(cudaMalloc(&hk, n * 2));
        cudaCheck(cudaMalloc(&hv, n * 2)); cudaCheck(cudaMalloc(&hout, n * 2));
        cudaCheck(cudaMalloc(&dmask, mask.size()));
        cudaCheck(cudaMemcpy(dq, q.data(), n * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dk, k.data(), n * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dv, v.data(), n * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dmask, mask.data(), mask.size(), cudaMemcpyHostToDevice));
        std::vector<__half> h(n);
        for (size_t i = 0; i < n; i++) h[i] = __float2half(q[i]);
        cudaCheck(cudaMemcpy(hq, h.data(), n * 2, cudaMemcpyHostToDevice));
        for (size_t i = 0; i < n; i++) h[i] = __float2half(k[i]);
        cudaCheck(cudaMemcpy(hk, h.data(), n * 2, cudaMemcpyHostToDevice));
        for (size_t i = 0; i < n; i++) h[i] = __float2half(v[i]);
        cudaCheck(cudaMemcpy(hv, h.data(), n * 2, cudaMemcpyHostToDevice));
        printf("batch %d heads %d seq %d head_dim %d mask %d\n", sh.batch, sh.heads, sh.seq, sh.dim, sh.mask);
        for (int version = 1; version <= 2; version++) {
            if (version == 2 && !v2_supports(sh.dim)) continue;
            char what[64];
            int st = moqe_router_attention_v(version, dq, dk, dv, dout, sh.mask ? dmask : NULL, sh.batch, sh.heads,
                                             sh.seq, sh.dim, tau, MOQE_ATTN_FP32, 0);
            cudaCheck(cudaDeviceSynchronize());
            if (st != MOQE_ATTN_OK) { printf("  v%d fp32: status %d\n", version, st); all_ok = false; continue; }
            cudaCheck(cudaMemcpy(got.data(), dout, n * 4, cudaMemcpyDeviceToHost));
            snprintf(what, sizeof(what), "v%d fp32", version);
            all_ok &= validate_result(got, ref, 1e-4f, what);
            st = moqe_router_attention_v(version, hq, hk, hv, hout, sh.mask ? dmask : NULL, sh.batch, sh.heads,
                                         sh.seq, sh.dim, tau, MOQE_ATTN_FP16, 0);
            cudaCheck(cudaDeviceSynchronize());
            if (st != MOQE_ATTN_OK) { printf("  v%d fp16: status %d\n", version, st); all_ok = false; continue; }
            cudaCheck(cudaMemcpy(h.data(), hout, n * 2, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < n; i++) got[i] = __half2float(h[i]);
            snprintf(what, sizeof(what), "v%d fp16 (inputs rounded to fp16)", version);
            all_ok &= validate_result(got, ref, 2e-2f, what);
        }
        cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dout);
        cudaFree(hq); cudaFree(hk); cudaFree(hv); cudaFree(hout); cudaFree(dmask);
    }
    // timings at the CV router's shape
    const int batches[] = {1, 64, 1024};
    cudaEvent_t t0, t1;
    cudaCheck(cudaEventCreate(&t0)); cudaCheck(cudaEventCreate(&t1));
    for (int batch : batches) {
        const size_t n = (size_t)batch * 8 * 64 * 8;
        __half *a, *b, *c, *o;
        cudaCheck(cudaMalloc(&a, n * 2)); cudaCheck(cudaMalloc(&b, n * 2));
        cudaCheck(cudaMalloc(&c, n * 2)); cudaCheck(cudaMalloc(&o, n * 2));
        cudaCheck(cudaMemset(a, 0, n * 2)); cudaCheck(cudaMemset(b, 0, n * 2)); cudaCheck(cudaMemset(c, 0, n * 2));
        for (int version = 1; version <= 2; version++) {
            const int reps = 200;
            for (int r = 0; r < 10; r++) moqe_router_attention_v(version, a, b, c, o, NULL, batch, 8, 64, 8, 0.35f, MOQE_ATTN_FP16, 0);
            cudaCheck(cudaEventRecord(t0));
            for (int r = 0; r < reps; r++) moqe_router_attention_v(version, a, b, c, o, NULL, batch, 8, 64, 8, 0.35f, MOQE_ATTN_FP16, 0);
            cudaCheck(cudaEventRecord(t1));
            cudaCheck(cudaEventSynchronize(t1));
            float ms;
            cudaCheck(cudaEventElapsedTime(&ms, t0, t1));
            const double us = 1e3 * ms / reps;
            printf("timing fp16 batch %4d heads 8 seq 64 head_dim 8 v%d: %8.2f us/launch (back to back), %6.0f GB/s\n",
                   batch, version, us, 4.0 * n * 2 / (us * 1e3));
        }
        cudaFree(a); cudaFree(b); cudaFree(c); cudaFree(o);
    }
    printf(all_ok ? "ALL OK\n" : "SOME CHECKS FAILED\n");
    return all_ok ? 0 : 1;
}
#endif
