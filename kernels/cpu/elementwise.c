/* Fused elementwise ops of the Llama block for CPU float32 (kernels/cpu_elementwise.py
 * loads this file; docs/kernels.md, "CPU elementwise ops").
 *
 * Each replaces a chain of small torch ops (RMSNorm: pow, mean, add, rsqrt, mul, mul;
 * rotary: two gathers' views, chunk, four muls, add, sub, cat; SwiGLU: silu, mul) by one
 * pass over the rows: no intermediate tensors, one call. The loops are written so that GCC
 * and Clang vectorise them at -O3 (AVX-512 / AVX2 with -march=native). Arithmetic is float32,
 * as the torch ops it replaces; only the order of the sum of squares and the exponential's
 * polynomial differ from torch (a few ulp).
 */
#include <math.h>
#include <stdint.h>

/* out = w * (x * 1 / sqrt(mean(x^2) + eps)) for n rows of d floats, x's rows x_stride
 * floats apart, out contiguous. */
void rms_norm_f32(const float *restrict x, int64_t x_stride, const float *restrict w,
                  float *restrict out, int64_t n, int64_t d, float eps) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict xr = x + i * x_stride;
        float *restrict o = out + i * d;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < d; j++) ss += xr[j] * xr[j];
        float r = 1.f / sqrtf(ss / (float)d + eps);
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) o[j] = w[j] * (xr[j] * r);
    }
}

/* The residual add and the next norm in one pass: acc += x (in place: the new residual
 * stream), out = rms_norm(acc); all [n, d] contiguous. */
void add_rms_norm_f32(const float *restrict x, float *restrict acc, const float *restrict w,
                      float *restrict out, int64_t n, int64_t d, float eps) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict xr = x + i * d;
        float *restrict ar = acc + i * d;
        float *restrict o = out + i * d;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < d; j++) {
            float v = xr[j] + ar[j];
            ar[j] = v;
            ss += v * v;
        }
        float r = 1.f / sqrtf(ss / (float)d + eps);
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) o[j] = w[j] * (ar[j] * r);
    }
}

/* Rotary embedding, neox layout (Hugging Face's rotate_half), in place: x holds n rows
 * x_stride floats apart, each `heads` heads of D contiguous floats; row i rotates by
 * cos[i * D/2 ..], sin[i * D/2 ..] (the tables already looked up at its position). */
void rotary_f32(float *restrict x, int64_t x_stride, int64_t n, int64_t heads, int64_t D,
                const float *restrict cos_rows, const float *restrict sin_rows) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < n; i++) {
        const float *restrict c = cos_rows + i * half;
        const float *restrict s = sin_rows + i * half;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict a = x + i * x_stride + h * D;
            float *restrict b = a + half;
            #pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                float x1 = a[j], x2 = b[j];
                a[j] = x1 * c[j] - x2 * s[j];
                b[j] = x2 * c[j] + x1 * s[j];
            }
        }
    }
}

/* exp(x) in float32, written to vectorise: x = k ln2 + r with k = round(x / ln2) (the
 * 1.5 * 2^23 trick rounds to nearest), ln2 split in two for an exact r, |r| <= ln2 / 2;
 * exp(r) by Cephes' degree-6 polynomial (relative error under 2e-7 there); 2^k built in the
 * exponent bits. x is clamped to [-87.3, 88.7], where 2^k stays a normal float. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float t = x * 1.44269504088896341f + 12582912.f;
    float k = t - 12582912.f;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t e = ((int32_t)k + 127) << 23;
    union { int32_t i; float f; } s = {.i = e};
    return p * s.f;
}

/* SwiGLU's activation: out[n, I] = silu(gu[:, :I]) * gu[:, I:], gu [n, 2I] contiguous. */
void silu_mul_f32(const float *restrict gu, float *restrict out, int64_t n, int64_t I) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict g = gu + i * 2 * I;
        const float *restrict up = g + I;
        float *restrict o = out + i * I;
        for (int64_t j = 0; j < I; j++) {
            float x = g[j];
            o[j] = x / (1.f + exp_f32(-x)) * up[j];
        }
    }
}
