/* Causal paged attention of a ragged batch on CPU, float32, read in place through the block
 * table (no gather), flash style (online softmax). Semantics: kernels/reference.py
 * (paged_attention_ref); design and measurements: docs/kernels.md, "The CPU kernel".
 *
 * Plain C with GCC/clang vector extensions (no intrinsics, no torch headers): a `vf` is 16
 * floats, one AVX-512 register (two AVX2 ones elsewhere; the compiler splits it). Built by
 * kernels/cpu/build.py with `cc -O3 -march=native` (its FLAGS), no -ffast-math.
 *
 * Work unit: one tile = up to MAX_ROWS query rows of one sequence and one KV head, rows being
 * (token, query head of that KV head's group) pairs, token-major, so each K/V chunk is read
 * once for the whole group. A tile walks its context in chunks of KC = 16 keys (a cache block
 * of 16 is one chunk, of 32 two):
 *   Kt = the chunk's keys transposed to [D][16] (16 keys = one vector),
 *   S[r] = sum_d q[r][d] * Kt[d]            (q pre-scaled by scale * log2(e): base 2),
 *   masked keys (past a row's position, past the context) -> -inf,
 *   m' = max(m, max S), P = 2^(S - m'), l = l 2^(m - m') + sum P,
 *   acc[r] = acc[r] 2^(m - m') + sum_k P[k] V[k]   (V rows read in place, D contiguous).
 * Chunks above the tile's last position are never visited (causal skip); slots past a
 * context are never read (they may hold NaN). The output is written once per tile. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define KC 16       /* keys per chunk: one vf */
#ifndef PREFETCH
#define PREFETCH 2 /* chunks of K and V prefetched ahead (the blocks are scattered) */
#endif
#define MAX_ROWS 16 /* query rows per tile: one lane of a vf each for m and l */
_Static_assert(MAX_ROWS == KC, "the running max and sum hold one row per lane");

typedef float vf __attribute__((vector_size(KC * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(KC * sizeof(int32_t))));
typedef float vf_u __attribute__((vector_size(KC * sizeof(float)), aligned(4), may_alias));

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf vload(const float *p) { return *(const vf_u *)p; }

static inline void vstore(float *p, vf v) { *(vf_u *)p = v; }

static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* 2^x for x <= 0 (and -inf, NaN -> 0): 2^x = 2^n * 2^f, n = round(x), |f| <= 1/2, 2^f by a
 * degree-6 polynomial (relative error ~2e-7). x is clamped at -127, where 2^n's exponent bits
 * are 0, so the result is exactly 0 there (values under 2^-126 flush to 0). */
static inline vf exp2v(vf x) {
    const vf lo = splat(-127.0f);
    vi keep = x > lo; /* false for NaN too */
    x = vselect(keep, x, lo);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x + magic) - magic;
    vf f = (x - n) * 0.69314718056f; /* 2^f = e^(f ln 2) */
    vf p = splat(1.0f / 720.0f);
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define UNPAREN(...) __VA_ARGS__
/* One stage of a 16x16 transpose: rows i and i + b swap their b-wide blocks. */
#define STAGE(r, b, LO, HI)                                                                   \
    for (int i = 0; i < KC; i++) {                                                            \
        if (i & (b)) continue;                                                                \
        vf lo_ = __builtin_shufflevector(r[i], r[i + (b)], UNPAREN LO);                       \
        vf hi_ = __builtin_shufflevector(r[i], r[i + (b)], UNPAREN HI);                       \
        r[i] = lo_;                                                                           \
        r[i + (b)] = hi_;                                                                     \
    }

/* r[i][j] <- r[j][i] in 4 stages of 16 two-source shuffles (vpermt2ps on AVX-512) instead
 * of 256 scalar moves. */
static inline void transpose16(vf r[KC]) {
    STAGE(r, 8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
          (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    STAGE(r, 4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
          (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    STAGE(r, 2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
          (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    STAGE(r, 1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
          (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#else /* no two-source shuffle builtin: scalar moves */
static inline void transpose16(vf r[KC]) {
    vf t[KC];
    memcpy(t, r, sizeof t);
    for (int i = 0; i < KC; i++)
        for (int j = 0; j < KC; j++) r[i][j] = t[j][i];
}
#endif

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t vi8 __attribute__((vector_size(8 * sizeof(int32_t))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t vi4 __attribute__((vector_size(4 * sizeof(int32_t))));
#define LO8(v) __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
#define HI8(v) __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
#define LO4(v) __builtin_shufflevector(v, v, 0, 1, 2, 3)
#define HI4(v) __builtin_shufflevector(v, v, 4, 5, 6, 7)

/* Horizontal max and sum as halving trees: log2(16) vector steps instead of 15 dependent
 * scalar ones (without -ffast-math the compiler keeps a loop's order), and a fixed order,
 * so results are deterministic. */
static inline float hmax(vf v) {
    vf8 a = LO8(v), b = HI8(v);
    vi8 ab = a > b;
    a = (vf8)((ab & (vi8)a) | (~ab & (vi8)b));
    vf4 c = LO4(a), d = HI4(a);
    vi4 cd = c > d;
    c = (vf4)((cd & (vi4)c) | (~cd & (vi4)d));
    const float x = c[0] > c[2] ? c[0] : c[2], y = c[1] > c[3] ? c[1] : c[3];
    return x > y ? x : y;
}

static inline float hsum(vf v) {
    vf8 a = LO8(v) + HI8(v);
    vf4 c = LO4(a) + HI4(a);
    return (c[0] + c[2]) + (c[1] + c[3]);
}
#else
static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < KC; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < KC; i++) s += v[i];
    return s;
}
#endif

typedef struct {
    const float *query; /* [T, H, D] contiguous */
    const float *k_cache, *v_cache; /* [NB, BS, Hkv, D] contiguous */
    const int32_t *block_row;       /* this sequence's block table row */
    float *out;                     /* [T, H, D] contiguous */
    int num_heads, num_kv_heads, head_dim, block_size, seq_len, q_len, q_start;
    float scale2; /* scale * log2(e) */
    float sink;   /* where touch_context's sums go, so they are not optimised away */
} Seq;

/* The cache slot of context position p. */
static inline int64_t slot_of(const Seq *s, int p) {
    return (int64_t)s->block_row[p / s->block_size] * s->block_size + p % s->block_size;
}

/* The K and V rows (one KV head's, at float offset `head`) of the chunk's keys k0 + kk,
 * kk < KC; past the nk valid ones, key k0's (a valid slot; never used). A chunk inside one
 * block (block_size a multiple of KC: 16, 32, ...) costs one table read and one division. */
static inline void chunk_rows(const Seq *s, int k0, int nk, int64_t slot_stride, int64_t head,
                              const float *krow[KC], const float *vrow[KC]) {
    if (s->block_size % KC == 0) {
        const int64_t base = slot_of(s, k0) * slot_stride + head;
        for (int kk = 0; kk < KC; kk++) {
            const int64_t off = base + (kk < nk ? kk : 0) * slot_stride;
            krow[kk] = s->k_cache + off;
            vrow[kk] = s->v_cache + off;
        }
        return;
    }
    for (int kk = 0; kk < KC; kk++) {
        const int64_t off = slot_of(s, k0 + (kk < nk ? kk : 0)) * slot_stride + head;
        krow[kk] = s->k_cache + off;
        vrow[kk] = s->v_cache + off;
    }
}

/* Prefetch the K and V rows of keys [k0, min(k0 + KC, end)): blocks are scattered, so the
 * hardware prefetcher cannot guess the next one. */
static inline void prefetch_chunk(const Seq *s, int k0, int end, int64_t slot_stride,
                                  int64_t head, int d) {
    const int nk = end - k0 < KC ? end - k0 : KC;
    const int contiguous = s->block_size % KC == 0;
    const int64_t base = contiguous ? slot_of(s, k0) * slot_stride + head : 0;
    for (int kk = 0; kk < nk; kk++) {
        const int64_t off = contiguous ? base + kk * slot_stride
                                       : slot_of(s, k0 + kk) * slot_stride + head;
        for (int c = 0; c < d; c += 16) {
            __builtin_prefetch(s->k_cache + off + c);
            __builtin_prefetch(s->v_cache + off + c);
        }
    }
}

/* kt[d][kk] = key kk's element d (0 past the nk valid keys, which are never read). */
#define DEFINE_LOAD_TRANSPOSED(D)                                                             \
    static inline void load_transposed_##D(vf kt[D], const float *krow[KC], int nk) {        \
        for (int c = 0; c < (D); c += KC) {                                                   \
            vf *r = kt + c;                                                                   \
            for (int kk = 0; kk < KC; kk++)                                                   \
                r[kk] = kk < nk ? vload(krow[kk] + c) : splat(0.0f);                          \
            transpose16(r);                                                                   \
        }                                                                                     \
    }

/* One tile: tokens [t0, t0 + nt) of `s` (relative to its first new token) and query heads
 * [h0, h0 + nh) of KV head `kvh`'s group. D is a compile-time constant in each copy. */
#define DEFINE_TILE(D)                                                                        \
    static void tile_##D(const Seq *s, int kvh, int h0, int nh, int t0, int nt) {             \
        enum { NV = (D) / KC };                                                               \
        const int rows = nh * nt, padded = (rows + 3) & ~3;                                   \
        float q[MAX_ROWS][D] __attribute__((aligned(64)));                                    \
        vf acc[MAX_ROWS][NV];                                                                 \
        vf mv = splat(-INFINITY), lv = splat(0.0f); /* running max and sum, one lane a row */ \
        int pos[MAX_ROWS];                                                                    \
        const int first_pos = s->seq_len - s->q_len; /* position of new token 0 */            \
        for (int r = 0; r < padded; r++) {                                                    \
            for (int v = 0; v < NV; v++) acc[r][v] = splat(0.0f);                             \
            if (r >= rows) { /* padding row: sees nothing */                                  \
                pos[r] = -1;                                                                  \
                memset(q[r], 0, sizeof q[r]);                                                 \
                continue;                                                                     \
            }                                                                                 \
            const int t = t0 + r / nh, h = h0 + r % nh;                                       \
            pos[r] = first_pos + t;                                                           \
            const float *src = s->query + ((int64_t)(s->q_start + t) * s->num_heads + h) * D; \
            for (int d = 0; d < D; d++) q[r][d] = src[d] * s->scale2;                         \
        }                                                                                     \
        const int min_pos = first_pos + t0, max_pos = first_pos + t0 + nt - 1;               \
        const int end = max_pos + 1 < s->seq_len ? max_pos + 1 : s->seq_len;                 \
        const int64_t slot_stride = (int64_t)s->num_kv_heads * D;                             \
        const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};               \
        vf kt[D];                                                                             \
        const float *vrow[KC];                                                                \
        for (int k0 = 0; k0 < PREFETCH * KC && k0 < end; k0 += KC)                            \
            prefetch_chunk(s, k0, end, slot_stride, (int64_t)kvh * D, D);                     \
        for (int k0 = 0; k0 < end; k0 += KC) {                                                \
            const int nk = end - k0 < KC ? end - k0 : KC;                                     \
            const float *krow[KC];                                                            \
            chunk_rows(s, k0, nk, slot_stride, (int64_t)kvh * D, krow, vrow);                 \
            if (k0 + PREFETCH * KC < end) /* PREFETCH chunks ahead */                         \
                prefetch_chunk(s, k0 + PREFETCH * KC, end, slot_stride, (int64_t)kvh * D, D); \
            load_transposed_##D(kt, krow, nk);                                                \
            const int need_mask = nk < KC || k0 + KC - 1 > min_pos;                           \
            vf sc[MAX_ROWS];                                                                  \
            for (int r = 0; r < padded; r += 4) {                                             \
                vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;                               \
                vf b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                        \
                for (int d = 0; d < D; d += 2) {                                              \
                    a0 += q[r][d] * kt[d];                                                    \
                    a1 += q[r + 1][d] * kt[d];                                                \
                    a2 += q[r + 2][d] * kt[d];                                                \
                    a3 += q[r + 3][d] * kt[d];                                                \
                    b0 += q[r][d + 1] * kt[d + 1];                                            \
                    b1 += q[r + 1][d + 1] * kt[d + 1];                                        \
                    b2 += q[r + 2][d + 1] * kt[d + 1];                                        \
                    b3 += q[r + 3][d + 1] * kt[d + 1];                                        \
                }                                                                             \
                sc[r] = a0 + b0;                                                              \
                sc[r + 1] = a1 + b1;                                                          \
                sc[r + 2] = a2 + b2;                                                          \
                sc[r + 3] = a3 + b3;                                                          \
            }                                                                                 \
            float pm[MAX_ROWS][KC] __attribute__((aligned(64)));                              \
            vf rowmax = splat(-INFINITY); /* rows past `padded` see nothing */                \
            for (int r = 0; r < padded; r++) {                                                \
                if (need_mask) {                                                              \
                    int lim = pos[r] - k0 + 1; /* keys kk < lim are visible */                \
                    if (lim > nk) lim = nk;                                                   \
                    sc[r] = vselect(lane < lim, sc[r], splat(-INFINITY));                     \
                }                                                                             \
                rowmax[r] = hmax(sc[r]);                                                      \
            }                                                                                 \
            /* Per row, as vectors over rows: the new running max and the rescale of what was \
             * summed so far. A row that has seen nothing keeps m = -inf; -inf - -inf is NaN, \
             * which exp2v maps to 0, so its P and its correction are 0 (its acc and l are 0). */\
            const vf m_new = vselect(mv > rowmax, mv, rowmax);                                \
            const vf corr = exp2v(mv - m_new);                                                \
            vf rowsum = splat(0.0f);                                                          \
            for (int r = 0; r < padded; r++) {                                                \
                const vf p = exp2v(sc[r] - m_new[r]);                                         \
                vstore(pm[r], p);                                                             \
                rowsum[r] = hsum(p);                                                          \
                for (int v = 0; v < NV; v++) acc[r][v] *= corr[r];                            \
            }                                                                                 \
            lv = lv * corr + rowsum;                                                          \
            mv = m_new;                                                                       \
            for (int r = 0; r < padded; r += 4) {                                             \
                for (int v = 0; v < NV; v++) {                                                \
                    vf c0 = acc[r][v], c1 = acc[r + 1][v], c2 = acc[r + 2][v],                \
                       c3 = acc[r + 3][v];                                                    \
                    for (int kk = 0; kk < nk; kk++) {                                         \
                        const vf vv = vload(vrow[kk] + v * KC);                               \
                        c0 += pm[r][kk] * vv;                                                 \
                        c1 += pm[r + 1][kk] * vv;                                             \
                        c2 += pm[r + 2][kk] * vv;                                             \
                        c3 += pm[r + 3][kk] * vv;                                             \
                    }                                                                         \
                    acc[r][v] = c0;                                                           \
                    acc[r + 1][v] = c1;                                                       \
                    acc[r + 2][v] = c2;                                                       \
                    acc[r + 3][v] = c3;                                                       \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < rows; r++) {                                                      \
            const int t = t0 + r / nh, h = h0 + r % nh;                                       \
            float *dst = s->out + ((int64_t)(s->q_start + t) * s->num_heads + h) * D;         \
            const float inv = lv[r] > 0.0f ? 1.0f / lv[r] : 0.0f;                             \
            for (int v = 0; v < NV; v++) vstore(dst + v * KC, acc[r][v] * inv);               \
        }                                                                                     \
    }

DEFINE_LOAD_TRANSPOSED(16)
DEFINE_LOAD_TRANSPOSED(32)
DEFINE_LOAD_TRANSPOSED(64)
DEFINE_LOAD_TRANSPOSED(128)
DEFINE_LOAD_TRANSPOSED(256)
DEFINE_TILE(16)
DEFINE_TILE(32)
DEFINE_TILE(64)
DEFINE_TILE(128)
DEFINE_TILE(256)

typedef void (*tile_fn)(const Seq *, int, int, int, int, int);

/* The cost of a tile in rough units (padded rows x key chunks visited, plus the tile's fixed
 * work): what the split between threads balances. */
static inline int64_t tile_cost(int rows, int first_pos, int t0, int nt, int seq_len) {
    const int end = first_pos + t0 + nt < seq_len ? first_pos + t0 + nt : seq_len;
    return (int64_t)((rows + 3) & ~3) * ((end + KC - 1) / KC) + 8;
}

#ifndef TOUCH_BYTES
#define TOUCH_BYTES (512 * 1024)
#endif

/* Reads a context's K and V blocks whole, in order, before its tiles run: independent loads
 * the core issues many at a time (and the hardware prefetcher follows within a block), so
 * the tiles then read from L2. The tiles alone read one KV head's rows of a block at a time
 * with their arithmetic in between, which leaves most of DRAM's latency exposed (a decode of
 * 64 x 300 tokens: 1.2 ms cold, 0.34 ms warm; a plain in-order read of its blocks: 0.38 ms).
 * Only for contexts whose K and V fit comfortably in L2 (TOUCH_BYTES). */
static float touch_context(const Seq *s) {
    const int head_dim = s->head_dim;
    const int64_t block_floats = (int64_t)s->block_size * s->num_kv_heads * head_dim;
    if (2 * 4 * block_floats * ((s->seq_len + s->block_size - 1) / s->block_size) > TOUCH_BYTES)
        return 0.0f;
    vf acc = splat(0.0f);
    for (int b = 0; b < (s->seq_len + s->block_size - 1) / s->block_size; b++) {
        const float *kb = s->k_cache + s->block_row[b] * block_floats;
        const float *vb = s->v_cache + s->block_row[b] * block_floats;
        for (int64_t c = 0; c + KC <= block_floats; c += KC) acc += vload(kb + c) + vload(vb + c);
    }
    return acc[0];
}

/* Walks every tile of the batch in a fixed order: with `tile` NULL only sums their costs;
 * otherwise runs the tiles of part `part` of `num_parts`: a tile belongs to the part its
 * cost-weighted start falls in (contiguous runs of tiles of about equal cost). */
static int64_t walk(Seq *s, tile_fn tile, const int32_t *query_start_loc,
                    const int32_t *seq_lens, const int32_t *block_tables,
                    int64_t block_table_stride, int batch, int64_t total, int part,
                    int num_parts) {
    const int group = s->num_heads / s->num_kv_heads;
    const int nh = group < MAX_ROWS ? group : MAX_ROWS; /* heads per tile */
    const int tokens = MAX_ROWS / nh;                   /* tokens per tile */
    int64_t done = 0;
    float sink = 0.0f;
    for (int i = 0; i < batch; i++) {
        s->q_start = query_start_loc[i];
        s->q_len = query_start_loc[i + 1] - s->q_start;
        s->seq_len = seq_lens[i];
        s->block_row = block_tables + (int64_t)i * block_table_stride;
        if (s->q_len <= 0 || s->seq_len <= 0) continue;
        const int first_pos = s->seq_len - s->q_len;
        if (tile != NULL && (num_parts == 1 || (int)(done * num_parts / total) == part))
            sink += touch_context(s);
        for (int kvh = 0; kvh < s->num_kv_heads; kvh++)
            for (int h0 = kvh * group; h0 < (kvh + 1) * group; h0 += nh) {
                const int left = (kvh + 1) * group - h0, heads = left < nh ? left : nh;
                for (int t0 = 0; t0 < s->q_len; t0 += tokens) {
                    const int nt = s->q_len - t0 < tokens ? s->q_len - t0 : tokens;
                    const int64_t cost = tile_cost(heads * nt, first_pos, t0, nt, s->seq_len);
                    if (tile != NULL && (num_parts == 1 || (int)(done * num_parts / total) == part))
                        tile(s, kvh, h0, heads, t0, nt);
                    done += cost;
                }
            }
    }
    *(volatile float *)&s->sink = sink; /* keeps the touching loads */
    return done;
}

static tile_fn tile_for(int head_dim) {
    switch (head_dim) {
    case 16: return tile_16;
    case 32: return tile_32;
    case 64: return tile_64;
    case 128: return tile_128;
    case 256: return tile_256;
    default: return NULL;
    }
}

/* The batch's total cost (tile_cost units): the caller splits work worth it between threads. */
int64_t paged_attention_cost(const int32_t *query_start_loc, const int32_t *seq_lens,
                             int64_t block_table_stride, int batch, int num_heads,
                             int num_kv_heads) {
    Seq s = {0};
    s.num_heads = num_heads;
    s.num_kv_heads = num_kv_heads;
    return walk(&s, NULL, query_start_loc, seq_lens, NULL, block_table_stride, batch, 1, 0, 1);
}

/* Part `part` of `num_parts` of the batch (threads call it with every part at once; the
 * parts write disjoint output rows). Returns 0; -1 if head_dim has no compiled copy (the
 * caller checks first); -2 if a block table entry a context needs is outside
 * [0, num_blocks) (nothing is computed then, by any part). */
int paged_attention_f32(const float *query, const float *k_cache, const float *v_cache,
                        const int32_t *query_start_loc, const int32_t *seq_lens,
                        const int32_t *block_tables, int64_t block_table_stride, int batch,
                        int num_heads, int num_kv_heads, int head_dim, int block_size,
                        int num_blocks, float scale, float *out, int part, int num_parts) {
    const tile_fn tile = tile_for(head_dim);
    if (tile == NULL) return -1;
    for (int i = 0; i < batch; i++) {
        if (query_start_loc[i + 1] <= query_start_loc[i]) continue;
        const int32_t *row = block_tables + (int64_t)i * block_table_stride;
        for (int b = 0; b < (seq_lens[i] + block_size - 1) / block_size; b++)
            if (row[b] < 0 || row[b] >= num_blocks) return -2;
    }
    if (part == 0) /* padding rows (seq_len 0): zeros */
        for (int i = 0; i < batch; i++) {
            const int q_len = query_start_loc[i + 1] - query_start_loc[i];
            if (q_len > 0 && seq_lens[i] <= 0)
                memset(out + (int64_t)query_start_loc[i] * num_heads * head_dim, 0,
                       sizeof(float) * (size_t)q_len * num_heads * head_dim);
        }
    Seq s = {query, k_cache, v_cache, 0, out, num_heads, num_kv_heads, head_dim, block_size,
             0, 0, 0, scale * 1.4426950408889634f, 0.0f};
    if (num_parts < 1) num_parts = 1;
    const int64_t total = num_parts == 1 ? 1 : walk(&s, NULL, query_start_loc, seq_lens,
                                                     block_tables, block_table_stride, batch,
                                                     1, 0, 1);
    if (total > 0)
        walk(&s, tile, query_start_loc, seq_lens, block_tables, block_table_stride, batch,
             total, part, num_parts);
    return 0;
}
