/* Fused router attention: out = softmax(Q K^T * tau + mask_bias) V, one kernel launch.

Layout: q, k, v, out are contiguous (batch, heads, seq, head_dim) tensors of one dtype
(fp32 or fp16; accumulation is always fp32). key_mask is NULL or a (batch, seq) uint8
array, 0 = padding key: such keys get the additive logit bias MOQE_ATTN_MASK_BIAS, exactly
as the NLP router's (B, 1, 1, T) bias (finite, so an all-padding row shifts every logit
alike and attends as if unmasked instead of producing NaN).

Shapes the routers use: CV 8 heads x head_dim 8 x seq 64; NLP 4 heads x head_dim <= 128 x
seq <= 512. Any head_dim in [1, 128] and seq in [1, MOQE_ATTN_MAX_SEQ] is accepted.

Every entry point returns a moqe_attn_status; nothing aborts. The CUDA entry points take
device pointers and enqueue on `stream` without synchronizing. */
#ifndef MOQE_ROUTER_ATTENTION_H
#define MOQE_ROUTER_ATTENTION_H

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA runtime's own definition, repeated so that this header (and the CPU reference)
   compile without the CUDA headers; an identical typedef is legal in C11 and C++. */
struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;

#define MOQE_ATTN_ABI_VERSION 1
#define MOQE_ATTN_MAX_HEAD_DIM 128
#define MOQE_ATTN_MAX_SEQ 4096
#define MOQE_ATTN_MASK_BIAS (-1e4f)

typedef enum {
    MOQE_ATTN_OK = 0,
    MOQE_ATTN_INVALID_ARGUMENT = 1, /* NULL pointer, non-positive size, non-finite tau */
    MOQE_ATTN_UNSUPPORTED = 2,      /* head_dim / seq / dtype / version outside what is built */
    MOQE_ATTN_CUDA_ERROR = 3        /* the launch failed: see moqe_attn_last_cuda_error() */
} moqe_attn_status;

typedef enum { MOQE_ATTN_FP32 = 0, MOQE_ATTN_FP16 = 1 } moqe_attn_dtype;

/* Kernel versions (llm.c style: numbered, each validated against the CPU reference).
   0 = pick the fastest that supports the shape; 1 = one warp per query row (any head_dim);
   2 = one thread per query row, K/V tiles in shared memory (head_dim 8, 16 or 32). */
#define MOQE_ATTN_AUTO 0

int moqe_attn_abi_version(void);
const char *moqe_attn_status_string(int status);
/* The message of the last CUDA error seen by this thread ("" if none). */
const char *moqe_attn_last_cuda_error(void);

int moqe_router_attention(const void *q, const void *k, const void *v, void *out,
                          const unsigned char *key_mask, int batch, int heads, int seq,
                          int head_dim, float tau, int dtype, cudaStream_t stream);

/* As moqe_router_attention, with an explicit kernel version (tests and benchmarks). */
int moqe_router_attention_v(int version, const void *q, const void *k, const void *v,
                            void *out, const unsigned char *key_mask, int batch, int heads,
                            int seq, int head_dim, float tau, int dtype, cudaStream_t stream);

/* CPU reference (router_attention_ref.c), fp32 host arrays, same layout and semantics.
   Plain two-pass softmax in double precision: the yardstick, not a fast path. */
int moqe_router_attention_ref(const float *q, const float *k, const float *v, float *out,
                              const unsigned char *key_mask, int batch, int heads, int seq,
                              int head_dim, float tau);

#ifdef __cplusplus
}
#endif
#endif
