/* CPU reference of the fused router attention (see router_attention.h).

Build (shared library for the Python tests):
    make -C kernels ref        # cc -O2 -std=c11 -fPIC -shared router_attention_ref.c -lm

Accumulates in double so that it is a yardstick for the fp32/fp16 GPU kernels, and does
the obvious two passes (max, then exp-sum and weighted V) rather than the online softmax
the kernels use: a bug shared by both would have to be made twice. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "router_attention.h"

int moqe_router_attention_ref(const float *q, const float *k, const float *v, float *out,
                              const unsigned char *key_mask, int batch, int heads, int seq,
                              int head_dim, float tau) {
    if (!q || !k || !v || !out) return MOQE_ATTN_INVALID_ARGUMENT;
    if (batch < 1 || heads < 1 || seq < 1 || head_dim < 1 || !isfinite(tau))
        return MOQE_ATTN_INVALID_ARGUMENT;
    if (head_dim > MOQE_ATTN_MAX_HEAD_DIM || seq > MOQE_ATTN_MAX_SEQ) return MOQE_ATTN_UNSUPPORTED;
    double *s = (double *)malloc(sizeof(double) * (size_t)seq);
    double *acc = (double *)malloc(sizeof(double) * (size_t)head_dim);
    if (!s || !acc) {
        free(s);
        free(acc);
        return MOQE_ATTN_INVALID_ARGUMENT;
    }
    for (int b = 0; b < batch; b++) {
        const unsigned char *mask = key_mask ? key_mask + (size_t)b * seq : NULL;
        for (int h = 0; h < heads; h++) {
            size_t base = ((size_t)b * heads + h) * seq * head_dim;
            const float *qb = q + base, *kb = k + base, *vb = v + base;
            for (int i = 0; i < seq; i++) {
                double m = -INFINITY;
                for (int j = 0; j < seq; j++) {
                    double dot = 0.0;
                    for (int d = 0; d < head_dim; d++)
                        dot += (double)qb[(size_t)i * head_dim + d] * kb[(size_t)j * head_dim + d];
                    s[j] = dot * tau + ((mask && !mask[j]) ? (double)MOQE_ATTN_MASK_BIAS : 0.0);
                    if (s[j] > m) m = s[j];
                }
                double l = 0.0;
                for (int d = 0; d < head_dim; d++) acc[d] = 0.0;
                for (int j = 0; j < seq; j++) {
                    double p = exp(s[j] - m);
                    l += p;
                    for (int d = 0; d < head_dim; d++) acc[d] += p * vb[(size_t)j * head_dim + d];
                }
                for (int d = 0; d < head_dim; d++)
                    out[base + (size_t)i * head_dim + d] = (float)(acc[d] / l);
            }
        }
    }
    free(s);
    free(acc);
    return MOQE_ATTN_OK;
}
