/* Fast executor of the LUT engine's instruction stream (spec: docs/lut-isa.md).
 *
 * It decodes the 64-bit instructions of one layer's stream and dispatches each to a vectorized
 * loop: TABLE builds activation tables, LUTACC looks 16 rows x 4 table indices up per weight
 * word with pshufb (int8 tables: up to 4 same-shape tiles together, a run of consecutive LUTACCs
 * per call with ACC in registers, see run_group and group_lutacc_run) or scalar loads (fp32
 * tables), SCALE/OUTLIER/STORE finish a tile. One source, two builds (native.py
 * ENGINE_ISAS): AVX2, and AVX-512 F/BW/VL (two tiles per 512-bit register), told apart by
 * LUT_ISA. Every float operation follows the order the spec gives (build with
 * -ffp-contract=off, no -ffast-math), so results equal the Python reference executor's bit for
 * bit in both builds. A first pass validates the whole stream against its operands before
 * anything runs. Adapted from the project's AVX2 T-MAC kernel (shared/notes/lutkern.c).
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT (thread pool) */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LUT_MAGIC 0x313041534954554cULL /* "LUTISA01" little-endian */
#define LUT_VERSION 1
#define HEADER_WORDS 4

enum { OP_END = 0, OP_TABLE = 1, OP_SYNC = 2, OP_TILE = 3, OP_LUTACC = 4, OP_SCALE = 5, OP_OUTLIER = 6,
       OP_STORE = 7, OP_BCQMUL = 8, OP_BCQACC = 9 };
enum { ERR_HEADER = 1, ERR_OPCODE = 2, ERR_TABLE = 3, ERR_WEIGHTS = 4, ERR_LUTACC = 5, ERR_SCALE = 6,
       ERR_OUTLIER = 7, ERR_STORE = 8, ERR_ORDER = 9, ERR_MEMORY = 10, ERR_ARGS = 11, ERR_LAUNCH = 12 };

#define FIELD(w, lo, width) (((w) >> (lo)) & ((1ULL << (width)) - 1))

typedef struct { int32_t row, col; float val; } outlier_t;

static int64_t fail(int64_t pos, int code) { return (pos << 8) | code; }

int lut_abi_version(void) { return 2; }

/* Which build this is (native.py ENGINE_ISAS[...].code): 1 AVX2, 2 AVX-512 (F/BW/VL). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LUT_ISA 2
#else
#define LUT_ISA 1
#endif
int lut_isa(void) { return LUT_ISA; }

/* ------------------------------------------------------------------ tables */

/* Entries e = 0..7 (lo) and 8..15 (hi) of one quad's table, in the spec's order
 * ((b0 x0 + b1 x1) + b2 x2) + b3 x3; a cleared bit adds +0.0 (exact). */
static inline void quad_table(const float* q, __m256* lo, __m256* hi) {
    const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
    const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
    __m256 t = _mm256_and_ps(_mm256_set1_ps(q[0]), m0);
    t = _mm256_add_ps(t, _mm256_and_ps(_mm256_set1_ps(q[1]), m1));
    t = _mm256_add_ps(t, _mm256_and_ps(_mm256_set1_ps(q[2]), m2));
    *lo = t;
    *hi = _mm256_add_ps(t, _mm256_set1_ps(q[3]));
}

/* Table kinds (lut_exec_tables): int8 tables of float activations, fp32 tables, and exact
 * integer tables of int8 activations (W4A8 / "activation_bits=8"). */
enum { TABLES_INT8 = 0, TABLES_FP32 = 1, TABLES_A8 = 2 };

/* Activations quantized to int8 per table block as llama.cpp's Q8_0 does (d = max|x| / 127,
 * q = round(x / d); here q = rint(x * (127 / max|x|)), ties to even), then tables of exact
 * integer sums T[e] = sum_j b_j q_j in [-508, 508], stored split as q = 16 qh + ql (qh in
 * [-8, 7], ql in [0, 15]): per quad 16 bytes of TH[e] = sum b_j qh_j, then 16 of TL[e] = sum
 * b_j ql_j, so both fit int8 lookups and T = 16 TH + TL exactly. TS = d, XS = d * sum(q). */
static void build_table_a8(const float* X, int64_t kpad, int64_t m, int64_t kg0, int64_t nkg, int8_t* tables,
                           int64_t tstride, float* ts, float* xs) {
    const float* xr = X + m * kpad + 4 * kg0;
    float mx = 0.f;
    int finite = 1;
    for (int64_t i = 0; i < 4 * nkg; i++) {
        const float a = xr[i] < 0.f ? -xr[i] : xr[i];
        finite &= a <= FLT_MAX;  /* false for inf and NaN */
        mx = a > mx ? a : mx;
    }
    int8_t* out = tables + m * tstride + kg0 * 32;
    if (!finite) {  /* no int8 scale exists: zero tables, NaN scales, so the block's outputs are NaN
                     * (as the reference executor's build_tables_a8; x * 0 would give rint(NaN)) */
        memset(out, 0, (size_t)(32 * nkg));
        *ts = *xs = NAN;
        return;
    }
    const float inv = mx > 0.f ? 127.f / mx : 0.f;
    int32_t qsum = 0;
    for (int64_t kg = 0; kg < nkg; kg++) {
        int32_t qh[4], ql[4];
        for (int j = 0; j < 4; j++) {
            const int32_t q = (int32_t)_mm_cvtss_si32(_mm_set_ss(xr[4 * kg + j] * inv)); /* rint, |q| <= 127 */
            qsum += q;
            qh[j] = q >> 4;  /* arithmetic shift: floor(q / 16) */
            ql[j] = q & 15;
        }
        for (int e = 0; e < 16; e++) {
            int32_t h = 0, l = 0;
            for (int j = 0; j < 4; j++)
                if (e >> j & 1) { h += qh[j]; l += ql[j]; }
            out[32 * kg + e] = (int8_t)h;
            out[32 * kg + 16 + e] = (int8_t)l;
        }
    }
    *ts = mx / 127.f;
    *xs = *ts * (float)qsum;
}

static void build_table(const float* X, int64_t kpad, int64_t m, int64_t kg0, int64_t nkg, int fp32,
                        void* tables, int64_t tstride, float* ts, float* xs) {
    const float* xr = X + m * kpad + 4 * kg0;
    float s = 0.f;
    for (int64_t i = 0; i < 4 * nkg; i++) s = s + xr[i];
    *xs = s;
    __m256 lo, hi;
    if (fp32) {
        float* out = (float*)tables + m * tstride + kg0 * 16;
        for (int64_t kg = 0; kg < nkg; kg++) {
            quad_table(xr + 4 * kg, &lo, &hi);
            _mm256_storeu_ps(out + 16 * kg, lo);
            _mm256_storeu_ps(out + 16 * kg + 8, hi);
        }
        *ts = 1.f;
        return;
    }
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmx = _mm256_setzero_ps();
    for (int64_t kg = 0; kg < nkg; kg++) {
        quad_table(xr + 4 * kg, &lo, &hi);
        vmx = _mm256_max_ps(vmx, _mm256_max_ps(_mm256_and_ps(lo, absmask), _mm256_and_ps(hi, absmask)));
    }
    float lanes[8], mx = 0.f;
    _mm256_storeu_ps(lanes, vmx);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    int8_t* out = (int8_t*)tables + m * tstride + kg0 * 16;
    for (int64_t kg = 0; kg < nkg; kg++) {
        quad_table(xr + 4 * kg, &lo, &hi);
        /* round to nearest even (MXCSR default), like numpy's rint; |t * inv| <= 127 */
        const __m256i qlo = _mm256_cvtps_epi32(_mm256_mul_ps(lo, inv));
        const __m256i qhi = _mm256_cvtps_epi32(_mm256_mul_ps(hi, inv));
        const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qlo, qhi), 0xD8);
        _mm_storeu_si128((__m128i*)(out + 16 * kg),
                         _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1)));
    }
    *ts = mx / 127.f;
}

/* ------------------------------------------------------------------ lookup-accumulate, fp32 tables */

static void lutacc_f32(const uint8_t* wp, int nwords, int quad, int plane, int64_t kg0, const float* T,
                       int64_t tstride, int64_t M, float* ACC) {
    const float s_lo = (float)(1 << plane), s_hi = (float)(1 << (plane + 2));
    for (int64_t m = 0; m < M; m++) {
        const float* tr = T + m * tstride;
        float lo_part[16] = {0}, hi_part[16] = {0};
        for (int w = 0; w < nwords; w++) {
            const uint8_t* b = wp + 32 * (int64_t)w;
            const float* t0 = tr + (quad ? kg0 + w : kg0 + 2 * w) * 16;
            const float* t1 = t0 + 16;
            for (int r = 0; r < 16; r++) {
                const int l0 = b[2 * r] & 15, l1 = b[2 * r + 1] & 15, h0 = b[2 * r] >> 4, h1 = b[2 * r + 1] >> 4;
                lo_part[r] = lo_part[r] + (t0[l0] + t0[l1] * 2.f);
                if (quad) hi_part[r] = hi_part[r] + (t0[h0] + t0[h1] * 2.f);
                else lo_part[r] = lo_part[r] + (t1[h0] + t1[h1] * 2.f);
            }
        }
        float* acc = ACC + m * 16;
        for (int r = 0; r < 16; r++) {
            acc[r] = acc[r] + lo_part[r] * s_lo;
            if (quad) acc[r] = acc[r] + hi_part[r] * s_hi;
        }
    }
}

/* BCQACC with fp32 tables: per (row, plane) float32 sums P = P + (T[kg][lo] + T[kg+1][hi]), then
 * ACC = ACC + P_j * w_j for planes j = 0, 1 (w: the BCQMUL record's weights as float32). */
static void bcqacc_f32(const uint8_t* wp, int nwords, int64_t kg0, const float* wts, const float* T,
                       int64_t tstride, int64_t M, float* ACC) {
    for (int64_t m = 0; m < M; m++) {
        const float* tr = T + m * tstride;
        float part[32] = {0};
        for (int w = 0; w < nwords; w++) {
            const uint8_t* b = wp + 32 * (int64_t)w;
            const float* t0 = tr + (kg0 + 2 * w) * 16;
            const float* t1 = t0 + 16;
            for (int i = 0; i < 32; i++) part[i] = part[i] + (t0[b[i] & 15] + t1[b[i] >> 4]);
        }
        float* acc = ACC + m * 16;
        for (int r = 0; r < 16; r++) {
            acc[r] = acc[r] + part[2 * r] * wts[2 * r];
            acc[r] = acc[r] + part[2 * r + 1] * wts[2 * r + 1];
        }
    }
}

/* A BCQMUL record's plane weights as float32 [16 rows][2 planes] (kind 0: int16 in the lane
 * order of the int8-table accumulators, rows 0-3, 8-11, 4-7, 12-15). */
static void bcq_weights_f32(const uint8_t* rec, int kind, float* out) {
    if (kind) { memcpy(out, rec, 32 * sizeof(float)); return; }
    static const int rows[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    int16_t v[32];
    memcpy(v, rec, sizeof(v));
    for (int q = 0; q < 16; q++) { out[2 * rows[q]] = (float)v[2 * q]; out[2 * rows[q] + 1] = (float)v[2 * q + 1]; }
}

/* ------------------------------------------------------------------ validation */

typedef struct {
    int64_t n, kpad, kg, blocks;
    int64_t ntables, nsegs;
    int64_t *tables, *segs; /* positions of TABLE instructions and TILE instructions */
    uint8_t *built, *covered; /* per block / per quad: some TABLE builds it (validation only) */
    uint8_t *stored;          /* per output row: some STORE writes it (validation only) */
} plan_t;

#define BCQ_INT_WORDS 2   /* BCQMUL kind 0: int16 plane weights [2 halves][2 lanes][4 rows][2 planes] */
#define BCQ_FLOAT_WORDS 4 /* BCQMUL kind 1: float32 plane weights [16 rows][2 planes] */
#define BCQ_SLOTS 4

static int64_t validate(const uint64_t* s, int64_t nw, int64_t wwords, int64_t pblocks, int64_t nout, plan_t* p) {
    if (nw < HEADER_WORDS + 1 || s[0] != LUT_MAGIC || (s[1] & 0xff) != LUT_VERSION || s[1] >> 16)
        return fail(0, ERR_HEADER);
    p->n = (int64_t)(s[2] & 0xffffffffULL);
    p->kpad = (int64_t)(s[2] >> 32);
    p->blocks = (int64_t)s[3];
    if (p->kpad % 4 || p->n <= 0) return fail(0, ERR_HEADER);
    p->kg = p->kpad / 4;
    int64_t tiles = 0;
    for (int64_t i = HEADER_WORDS; i < nw; i++) tiles += (s[i] & 0xff) == OP_TILE;
    /* blocks are disjoint, >= 1 quad; every output row lies in some tile (bounds Y and `stored`) */
    if (p->blocks < 0 || p->blocks > p->kg || p->n > 16 * tiles) return fail(0, ERR_HEADER);
    p->built = calloc((size_t)p->blocks + 1, 1);
    p->covered = calloc((size_t)p->kg + 1, 1);
    p->stored = calloc((size_t)p->n, 1);
    if (!p->built || !p->covered || !p->stored) return fail(0, ERR_MEMORY);
    p->tables = malloc(sizeof(int64_t) * nw);
    p->segs = malloc(sizeof(int64_t) * nw);
    if (!p->tables || !p->segs) return fail(0, ERR_MEMORY);
    p->ntables = p->nsegs = 0;
    int phase = 0; /* 0 tables, 1 between tiles, 2 inside a tile, 3 ended */
    int64_t wptr = 0;
    int slots = 0; /* BCQMUL slots set in the current tile */
    for (int64_t i = HEADER_WORDS; i < nw; i++) {
        const uint64_t w = s[i];
        const int op = (int)(w & 0xff);
        switch (op) {
        case OP_TABLE: {
            const int64_t g = FIELD(w, 8, 20), kg0 = FIELD(w, 28, 20), nkg = FIELD(w, 48, 16) + 1;
            if (phase != 0) return fail(i, ERR_ORDER);
            if (g >= p->blocks || kg0 + nkg > p->kg || p->built[g]) return fail(i, ERR_TABLE);
            for (int64_t q = kg0; q < kg0 + nkg; q++) {  /* tables are built in parallel: no overlaps */
                if (p->covered[q]) return fail(i, ERR_TABLE);
                p->covered[q] = 1;
            }
            p->built[g] = 1;
            p->tables[p->ntables++] = i;
            break;
        }
        case OP_SYNC:
            if (phase != 0 || w >> 8) return fail(i, ERR_ORDER);
            phase = 1;
            break;
        case OP_TILE:
            if (phase != 1) return fail(i, ERR_ORDER);
            wptr = (int64_t)FIELD(w, 8, 56);
            p->segs[p->nsegs++] = i;
            phase = 2;
            slots = 0;
            break;
        case OP_LUTACC: {
            const int quad = FIELD(w, 8, 1) == 0;
            const int64_t plane = FIELD(w, 9, 4), kg0 = FIELD(w, 13, 20), nwords = FIELD(w, 33, 7) + 1;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (w >> 60 || (int64_t)FIELD(w, 40, 20) >= p->blocks || !p->built[FIELD(w, 40, 20)]
                || plane + (quad ? 3 : 1) > 15
                || nwords > (quad ? 64 : 32)
                || kg0 + (quad ? nwords : 2 * nwords) > p->kg + 1) return fail(i, ERR_LUTACC);
            if (wptr < 0 || wptr + nwords > wwords) return fail(i, ERR_WEIGHTS);
            wptr += nwords;
            break;
        }
        case OP_BCQMUL: {
            const int64_t words = FIELD(w, 10, 1) ? BCQ_FLOAT_WORDS : BCQ_INT_WORDS;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (w >> 11) return fail(i, ERR_LUTACC);
            if (wptr < 0 || wptr + words > wwords) return fail(i, ERR_WEIGHTS);
            wptr += words;
            slots |= 1 << FIELD(w, 8, 2);
            break;
        }
        case OP_BCQACC: {
            const int64_t npairs = FIELD(w, 8, 2) + 1, kg0 = FIELD(w, 10, 20), nwords = FIELD(w, 30, 6) + 1,
                          block = FIELD(w, 36, 20);
            const int need = (1 << npairs) - 1;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (w >> 56 || block >= p->blocks || !p->built[block] || (slots & need) != need
                || kg0 + 2 * nwords > p->kg + 1) return fail(i, ERR_LUTACC);
            if (wptr < 0 || wptr + npairs * nwords > wwords) return fail(i, ERR_WEIGHTS);
            wptr += npairs * nwords;
            break;
        }
        case OP_SCALE: {
            const int64_t b0 = FIELD(w, 8, 20), nb = FIELD(w, 28, 8) + 1;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (b0 + nb > p->blocks || (int64_t)FIELD(w, 36, 28) >= pblocks) return fail(i, ERR_SCALE);
            for (int64_t b = b0; b < b0 + nb; b++)
                if (!p->built[b]) return fail(i, ERR_SCALE);
            break;
        }
        case OP_OUTLIER: {
            const int64_t start = FIELD(w, 8, 36), count = FIELD(w, 44, 20) + 1;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (start + count > nout) return fail(i, ERR_OUTLIER);
            break;
        }
        case OP_STORE: {
            const int64_t row0 = FIELD(w, 8, 32), nrows = FIELD(w, 40, 5) + 1;
            if (phase != 2) return fail(i, ERR_ORDER);
            if (w >> 45 || nrows > 16 || row0 + nrows > p->n) return fail(i, ERR_STORE);
            for (int64_t r = row0; r < row0 + nrows; r++) { /* tiles run in parallel: one writer per row */
                if (p->stored[r]) return fail(i, ERR_STORE);
                p->stored[r] = 1;
            }
            phase = 1;
            break;
        }
        case OP_END:
            if (phase != 1 || w >> 8 || i != nw - 1) return fail(i, ERR_ORDER);
            phase = 3;
            break;
        default:
            return fail(i, ERR_OPCODE);
        }
    }
    return phase == 3 ? 0 : fail(nw, ERR_ORDER);
}

/* ------------------------------------------------------------------ execution */

/* One tile with fp32 tables (int8 tables run in groups of tiles: run_group). */
static void run_segment(const uint64_t* s, int64_t i, const plan_t* p, const uint8_t* W, const float* P,
                        const outlier_t* O, const float* X, int64_t M, float* Y, const float* tables,
                        int64_t tstride, const float* XS, float* acc, float* yt) {
    int64_t wptr = (int64_t)FIELD(s[i], 8, 56);
    float mulw[BCQ_SLOTS][32] = {{0}};
    memset(acc, 0, sizeof(float) * 16 * M);
    memset(yt, 0, sizeof(float) * 16 * M);
    for (i = i + 1;; i++) {
        const uint64_t w = s[i];
        switch ((int)(w & 0xff)) {
        case OP_LUTACC: {
            const int quad = FIELD(w, 8, 1) == 0, plane = (int)FIELD(w, 9, 4);
            const int64_t kg0 = FIELD(w, 13, 20);
            const int nwords = (int)FIELD(w, 33, 7) + 1;
            lutacc_f32(W + 32 * wptr, nwords, quad, plane, kg0, tables, tstride, M, acc);
            wptr += nwords;
            break;
        }
        case OP_BCQMUL: {
            const int kind = (int)FIELD(w, 10, 1);
            bcq_weights_f32(W + 32 * wptr, kind, mulw[FIELD(w, 8, 2)]);
            wptr += kind ? BCQ_FLOAT_WORDS : BCQ_INT_WORDS;
            break;
        }
        case OP_BCQACC: {
            const int npairs = (int)FIELD(w, 8, 2) + 1, nwords = (int)FIELD(w, 30, 6) + 1;
            for (int q = 0; q < npairs; q++)
                bcqacc_f32(W + 32 * (wptr + (int64_t)q * nwords), nwords, FIELD(w, 10, 20), mulw[q], tables, tstride,
                           M, acc);
            wptr += (int64_t)npairs * nwords;
            break;
        }
        case OP_SCALE: {
            const int64_t b0 = FIELD(w, 8, 20), nb = FIELD(w, 28, 8) + 1;
            const float* blk = P + 32 * (int64_t)FIELD(w, 36, 28);
            for (int64_t m = 0; m < M; m++) {
                float xs = XS[m * p->blocks + b0];
                for (int64_t b = b0 + 1; b < b0 + nb; b++) xs = xs + XS[m * p->blocks + b];
                float* y = yt + m * 16;
                float* a = acc + m * 16;
                for (int r = 0; r < 16; r++) {
                    const float t2 = a[r] * blk[r], t3 = blk[16 + r] * xs;
                    y[r] = y[r] + (t2 - t3);
                    a[r] = 0.f;
                }
            }
            break;
        }
        case OP_OUTLIER: {
            const int64_t start = FIELD(w, 8, 36), count = FIELD(w, 44, 20) + 1;
            for (int64_t m = 0; m < M; m++)
                for (int64_t o = start; o < start + count; o++)
                    yt[m * 16 + O[o].row] = yt[m * 16 + O[o].row] + O[o].val * X[m * p->kpad + O[o].col];
            break;
        }
        case OP_STORE: {
            const int64_t row0 = FIELD(w, 8, 32), nrows = FIELD(w, 40, 5) + 1;
            for (int64_t m = 0; m < M; m++) memcpy(Y + m * p->n + row0, yt + m * 16, sizeof(float) * nrows);
            return;
        }
        default:
            return; /* unreachable after validation */
        }
    }
}

/* ------------------------------------------------------------------ tile groups (int8 tables) */

/* Up to GROUP_TILES tiles of one shape (same LUTACC and SCALE words but for SCALE.pidx, which
 * codegen emits for every tile of a layer) run together: each table vector is loaded once and
 * used for every tile, the loop and dispatch overhead is paid once per group, and the tiles'
 * accumulations are independent chains. Per row, every float operation is the single-tile
 * path's, in the same order, so grouping changes no bit of the result. With AVX-512 two tiles
 * share one 512-bit register (tile a in the low half, b in the high half). */
#define GROUP_TILES 4
/* Software prefetch of the weight and parameter streams: each LUTACC prefetches the span it
 * reads GROUP_PREFETCH bytes further on in each tile's stream, once per cache line and outside the
 * word loops (non-temporal: the weights are read once per call); each SCALE prefetches the
 * parameter blocks PARAM_PREFETCH blocks on and the tiles' instruction words STREAM_PREFETCH
 * words on (a stream is read once per call too: 0.33 MB at N = K = 4096). A group reads
 * GROUP_TILES weight streams side by side; on one core the hardware prefetcher alone kept too few
 * lines in flight (4-bit N = K = 4096, 1 thread, cold, C driver, medians: 512 bytes ahead in the
 * word loop 0.52 ms, 2 KiB 0.40, 3 KiB non-temporal 0.31-0.34). */
#ifndef GROUP_PREFETCH
#define GROUP_PREFETCH 3072
#endif
#ifndef PARAM_PREFETCH
#define PARAM_PREFETCH 4
#endif
#ifndef STREAM_PREFETCH
#define STREAM_PREFETCH 32 /* instruction words ahead in each tile's stream, at each SCALE */
#endif
static inline void prefetch_span(const uint8_t* const* wp, int nt, int64_t bytes) {
    for (int t = 0; t < nt; t++)
        for (int64_t off = 0; off < bytes; off += 64)
            _mm_prefetch((const char*)(wp[t] + GROUP_PREFETCH + off), _MM_HINT_NTA);
}
/* Where a group's tiles lie one after the other (codegen's layout), the next group's weights
 * (and, with SHAPE_STEP, its parameter blocks) are one contiguous span each, and are prefetched
 * in address order instead: LIN_AHEAD groups ahead, as much per LUTACC (SCALE) as the group
 * consumes, so the span is in cache when the next group starts. Zen 5, one core: the hardware
 * streams one or two sequential streams at ~30 GB/s but four interleaved ones at 12-20; a C
 * model of a 2-bit N = K = 4096 call's reads (4 tiles x 16 KiB + parameters, no compute) went
 * from 20-24 GB/s with per-tile prefetch to 26-30 (shared machine). Measured on the 2-bit call:
 * one group ahead and NTA beat two groups ahead and T0/T1 hints. */
#ifndef LIN_AHEAD
#define LIN_AHEAD 1
#endif
#ifndef LIN_HINT
#define LIN_HINT _MM_HINT_NTA
#endif
/* Prefetches `bytes` from *cur on, in address order, and moves *cur past them. */
static inline void prefetch_lin(const uint8_t** cur, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char*)(*cur + off), LIN_HINT);
    *cur += bytes;
}
#define SCALE_PIDX_MASK (~(((1ULL << 28) - 1) << 36))

static int same_shape(const uint64_t* s, const int64_t* tile, int nt) {
    for (int64_t rel = 1;; rel++) {
        const uint64_t w0 = s[tile[0] + rel];
        const int op = (int)(w0 & 0xff);
        for (int t = 1; t < nt; t++) {
            const uint64_t w = s[tile[t] + rel];
            if ((int)(w & 0xff) != op) return 0;
            if ((op == OP_LUTACC || op == OP_BCQMUL || op == OP_BCQACC) && w != w0) return 0;
            if (op == OP_SCALE && (w & SCALE_PIDX_MASK) != (w0 & SCALE_PIDX_MASK)) return 0;
        }
        if (op == OP_STORE) return 1;
    }
}

/* One lookup of table vector tb with index vector ix, merged into an int16 accumulator. */
#if LUT_ISA == 2
typedef __m512i vec_t;
#define V_AND _mm512_and_si512
#define V_SRLI16 _mm512_srli_epi16
#define V_ADD16 _mm512_add_epi16
#define V_MADDUBS _mm512_maddubs_epi16
#define V_SHUF _mm512_shuffle_epi8
#define V_ZERO _mm512_setzero_si512
#define V_TABLE(p) _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(p)))
#define V_MADD _mm512_madd_epi16
#define V_ADD32 _mm512_add_epi32
#define V_SLLI32 _mm512_slli_epi32
#define V_UNPACKLO16 _mm512_unpacklo_epi16
#define V_UNPACKHI16 _mm512_unpackhi_epi16
#define V_UNPACKLO8 _mm512_unpacklo_epi8
#define V_UNPACKHI8 _mm512_unpackhi_epi8
#define V_STORE(p, v) _mm512_storeu_si512((void*)(p), v)
#define TILES_PER_VEC 2
#define V_SET1_8 _mm512_set1_epi8
#define V_SET1_16 _mm512_set1_epi16
#define V_SET1_32 _mm512_set1_epi32
/* The words of tiles a and b (b may be a again) as one 512-bit vector: a low, b high. */
static inline vec_t load_word(const uint8_t* const* wp, int v, int nt, int64_t off) {
    const uint8_t* a = wp[2 * v];
    const uint8_t* b = wp[2 * v + 1 < nt ? 2 * v + 1 : 2 * v];
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(a + off))),
                              _mm256_loadu_si256((const __m256i*)(b + off)), 1);
}
#else
typedef __m256i vec_t;
#define V_AND _mm256_and_si256
#define V_SRLI16 _mm256_srli_epi16
#define V_ADD16 _mm256_add_epi16
#define V_MADDUBS _mm256_maddubs_epi16
#define V_SHUF _mm256_shuffle_epi8
#define V_ZERO _mm256_setzero_si256
#define V_TABLE(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(p)))
#define V_MADD _mm256_madd_epi16
#define V_ADD32 _mm256_add_epi32
#define V_SLLI32 _mm256_slli_epi32
#define V_UNPACKLO16 _mm256_unpacklo_epi16
#define V_UNPACKHI16 _mm256_unpackhi_epi16
#define V_UNPACKLO8 _mm256_unpacklo_epi8
#define V_UNPACKHI8 _mm256_unpackhi_epi8
#define V_STORE(p, v) _mm256_storeu_si256((__m256i*)(p), v)
#define TILES_PER_VEC 1
#define V_SET1_8 _mm256_set1_epi8
#define V_SET1_16 _mm256_set1_epi16
#define V_SET1_32 _mm256_set1_epi32
static inline vec_t load_word(const uint8_t* const* wp, int v, int nt, int64_t off) {
    (void)nt;
    return _mm256_loadu_si256((const __m256i*)(wp[v] + off));
}
#endif
#define LOOKUP(acc, tb, ix) acc = V_ADD16(acc, V_MADDUBS(w12, V_SHUF(tb, ix)))

/* ACC[t][m] += float32(part) * ts for the int32 row sums of the vector's tiles:
 * l0x = rows [0-3, 8-11] (per tile), l1x = rows [4-7, 12-15]. */
static inline void add_parts(vec_t l0x, vec_t l1x, int v, int nt, int64_t M, int64_t m, float tsv, float* ACC) {
#if LUT_ISA == 2
    const __m512i idx_a = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i idx_b = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __m512 ts = _mm512_set1_ps(tsv);
    for (int h = 0; h < 2 && 2 * v + h < nt; h++) {
        const __m512i rows = _mm512_permutex2var_epi64(l0x, h ? idx_b : idx_a, l1x);
        float* acc = ACC + ((2 * v + h) * M + m) * 16;
        _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), _mm512_mul_ps(_mm512_cvtepi32_ps(rows), ts)));
    }
#else
    (void)nt;
    const __m256 ts = _mm256_set1_ps(tsv);
    float* acc = ACC + (v * M + m) * 16;
    const __m256i l0 = _mm256_permute2x128_si256(l0x, l1x, 0x20);
    const __m256i l1 = _mm256_permute2x128_si256(l0x, l1x, 0x31);
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), _mm256_mul_ps(_mm256_cvtepi32_ps(l0), ts)));
    _mm256_storeu_ps(acc + 8, _mm256_add_ps(_mm256_loadu_ps(acc + 8), _mm256_mul_ps(_mm256_cvtepi32_ps(l1), ts)));
#endif
}

/* ------------------------------------------------------------------ runs of LUTACCs (int8 tables) */

/* A tile's float ACC in the order the int32 row sums leave the lookups: per tile, `c0` holds rows
 * 0-3, 8-11 and `c1` rows 4-7, 12-15 (AVX-512: tile a in the low half, b in the high half). A
 * run of LUTACCs keeps ACC in registers in this order and permutes from and to row order once per
 * run, where add_parts permutes and goes through memory once per instruction. Permuting moves
 * values, so every row sees the same float operations in the same order. */
#if LUT_ISA == 2
typedef __m512 fvec_t;
#define F_SET1 _mm512_set1_ps
#define F_ACC(f, ints, ts) f = _mm512_add_ps(f, _mm512_mul_ps(_mm512_cvtepi32_ps(ints), ts))
static inline __m512 perm64(__m512 a, __m512i idx, __m512 b) {
    return _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(a), idx, _mm512_castps_pd(b)));
}
static inline void acc_to_lanes(const float* ACC, int v, int nt, int64_t M, int64_t m, fvec_t* c0, fvec_t* c1) {
    const __m512 a = _mm512_loadu_ps(ACC + ((2 * v) * M + m) * 16);
    const __m512 b = 2 * v + 1 < nt ? _mm512_loadu_ps(ACC + ((2 * v + 1) * M + m) * 16) : a;
    *c0 = perm64(a, _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), b);
    *c1 = perm64(a, _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15), b);
}
static inline void lanes_to_acc(fvec_t c0, fvec_t c1, int v, int nt, int64_t M, int64_t m, float* ACC) {
    _mm512_storeu_ps(ACC + ((2 * v) * M + m) * 16, perm64(c0, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), c1));
    if (2 * v + 1 < nt)
        _mm512_storeu_ps(ACC + ((2 * v + 1) * M + m) * 16,
                         perm64(c0, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), c1));
}
#else
typedef __m256 fvec_t;
#define F_SET1 _mm256_set1_ps
#define F_ACC(f, ints, ts) f = _mm256_add_ps(f, _mm256_mul_ps(_mm256_cvtepi32_ps(ints), ts))
static inline void acc_to_lanes(const float* ACC, int v, int nt, int64_t M, int64_t m, fvec_t* c0, fvec_t* c1) {
    (void)nt;
    const __m256 r0 = _mm256_loadu_ps(ACC + (v * M + m) * 16), r8 = _mm256_loadu_ps(ACC + (v * M + m) * 16 + 8);
    *c0 = _mm256_permute2f128_ps(r0, r8, 0x20);
    *c1 = _mm256_permute2f128_ps(r0, r8, 0x31);
}
static inline void lanes_to_acc(fvec_t c0, fvec_t c1, int v, int nt, int64_t M, int64_t m, float* ACC) {
    (void)nt;
    _mm256_storeu_ps(ACC + (v * M + m) * 16, _mm256_permute2f128_ps(c0, c1, 0x20));
    _mm256_storeu_ps(ACC + (v * M + m) * 16 + 8, _mm256_permute2f128_ps(c0, c1, 0x31));
}
#endif

/* The word loop of one LUTACC for NV vectors of tiles. Quad mode: lo nibbles -> a_lo, hi -> a_hi
 * (planes p+j and p+2+j); pair mode: lo nibbles (quad kg) and hi (quad kg+1), both plane p+j, ->
 * a_lo (32 words x 2 x 381 < 2^15; a_hi stays 0). A8 (int8 activations, tables TH then TL per
 * quad; hi nibbles to a_hi/b_hi in both modes): the TH lookups go to a_*, the TL lookups to b_*,
 * part = 16 a + b. A8 fused (at most A8_FUSED_WORDS words): TH is looked up with byte weights
 * (16, 32) instead of (1, 2), so 16 TH + TL of a word (|.| <= 16 x 3 x 32 = 1536) is summed in
 * one int16 accumulator: 21 x 1536 < 2^15, half the accumulators and the same exact integers. */
/* A LUTACC run's int16 lane sums widened to int32 with the plane weight pw (lookup lane order):
 * a_lo/a_hi the low nibbles' sums and, for int8 activations not fused into one sum, b_lo/b_hi
 * the high nibbles' (x16). Declares l0x, l1x (lanes of the tile's low / high halves). */
#define WIDEN_RUN(v, A8, l0x, l1x)                                                                    \
    vec_t l0x = V_MADD(V_UNPACKLO16(a_lo[v], a_hi[v]), pw);                                           \
    vec_t l1x = V_MADD(V_UNPACKHI16(a_lo[v], a_hi[v]), pw);                                           \
    if (A8 && !fused) {                                                                               \
        l0x = V_ADD32(V_SLLI32(l0x, 4), V_MADD(V_UNPACKLO16(b_lo[v], b_hi[v]), pw));                  \
        l1x = V_ADD32(V_SLLI32(l1x, 4), V_MADD(V_UNPACKHI16(b_lo[v], b_hi[v]), pw));                  \
    }
#define A8_FUSED_WORDS 21
#define RUN_WORDS(NV, A8, FUSED, PF)                                                                  \
    for (int w = 0; w < nwords; w++) {                                                                \
        PF;                                                                                           \
        const int64_t k0 = quad ? kg0 + w : kg0 + 2 * w, k1 = quad ? k0 : k0 + 1;                     \
        const vec_t t0 = V_TABLE(tr + k0 * tq), t1 = V_TABLE(tr + k1 * tq);                           \
        vec_t u0 = t0, u1 = t1;                                                                       \
        if (A8) { u0 = V_TABLE(tr + k0 * tq + 16); u1 = V_TABLE(tr + k1 * tq + 16); }                 \
        for (int v = 0; v < NV; v++) {                                                                \
            const vec_t x = load_word(wq, v, nt, 32 * (int64_t)w);                                    \
            const vec_t lo = V_AND(x, mask), hi = V_AND(V_SRLI16(x, 4), mask);                        \
            if (A8 && FUSED) {                                                                        \
                a_lo[v] = V_ADD16(a_lo[v], V_ADD16(V_MADDUBS(w1632, V_SHUF(t0, lo)), V_MADDUBS(w12, V_SHUF(u0, lo)))); \
                a_hi[v] = V_ADD16(a_hi[v], V_ADD16(V_MADDUBS(w1632, V_SHUF(t1, hi)), V_MADDUBS(w12, V_SHUF(u1, hi)))); \
                continue;                                                                             \
            }                                                                                         \
            LOOKUP(a_lo[v], t0, lo);                                                                  \
            if (quad || A8) LOOKUP(a_hi[v], t1, hi); else LOOKUP(a_lo[v], t1, hi);                    \
            if (A8) { LOOKUP(b_lo[v], u0, lo); LOOKUP(b_hi[v], u1, hi); }                             \
        }                                                                                             \
    }
#define RUN_WORDS_Q(NV, A8, FUSED, PF)                                                                \
    { if (quad) { const int quad = 1; RUN_WORDS(NV, A8, FUSED, PF) } else { const int quad = 0; RUN_WORDS(NV, A8, FUSED, PF) } }

/* `count` LUTACC words (ins) for NV vectors of tiles, one activation row m. Per instruction and
 * row the int32 part is a_lo 2^p + a_hi 2^(p+2) (quad) or (a_lo + a_hi) 2^p (pair), with A8
 * 16 part(a) + part(b) (fused: already in a), and ACC = ACC + float32(part) * TS[block] (the
 * spec's order). */
#define RUN_BODY(NV, A8)                                                                              \
    {                                                                                                 \
        fvec_t c0[NV], c1[NV];                                                                        \
        const uint8_t* wq[GROUP_TILES];                                                               \
        for (int t = 0; t < nt; t++) wq[t] = wp[t];                                                   \
        for (int v = 0; v < NV; v++) acc_to_lanes(ACC, v, nt, M, m, &c0[v], &c1[v]);                 \
        for (int i = 0; i < count; i++) {                                                             \
            const uint64_t w = ins[i];                                                                \
            const int quad = FIELD(w, 8, 1) == 0, plane = (int)FIELD(w, 9, 4);                        \
            const int64_t kg0 = FIELD(w, 13, 20);                                                     \
            const int nwords = (int)FIELD(w, 33, 7) + 1;                                              \
            if (m == 0) { if (lin) prefetch_lin(lin, 32 * (int64_t)nwords * nt); else prefetch_span(wq, nt, 32 * (int64_t)nwords); } \
            const fvec_t ts = F_SET1(TS[m * tsstride + (int64_t)FIELD(w, 40, 20)]);                  \
            const vec_t pw = V_SET1_32((int)((1u << plane) | ((quad ? 1u << (plane + 2) : 1u << plane) << 16))); \
            vec_t a_lo[NV], a_hi[NV], b_lo[NV], b_hi[NV];                                             \
            for (int v = 0; v < NV; v++) a_lo[v] = a_hi[v] = b_lo[v] = b_hi[v] = V_ZERO();           \
            const int fused = A8 && nwords <= A8_FUSED_WORDS;                                        \
            if (fused) RUN_WORDS_Q(NV, A8, 1, (void)0) else RUN_WORDS_Q(NV, A8, 0, (void)0)           \
            for (int v = 0; v < NV; v++) {                                                            \
                WIDEN_RUN(v, A8, l0x, l1x)                                                            \
                F_ACC(c0[v], l0x, ts);                                                                \
                F_ACC(c1[v], l1x, ts);                                                                \
            }                                                                                         \
            for (int t = 0; t < nt; t++) wq[t] += 32 * (int64_t)nwords;                               \
        }                                                                                             \
        for (int v = 0; v < NV; v++) lanes_to_acc(c0[v], c1[v], v, nt, M, m, ACC);                   \
    }

/* `count` consecutive LUTACC words (ins; the same in every tile of the group, same_shape) for nt
 * tiles with int8 tables (a8: of int8 activations; wp: each tile's next weight word; TS:
 * [M][blocks]). Activation rows run one after the other over the run's words (they stay in L1). */
static void group_lutacc_run(const uint8_t* const* wp, int nt, const uint64_t* ins, int count, const int8_t* T,
                             int64_t tstride, int a8, const float* TS, int64_t tsstride, int64_t M, float* ACC,
                             const uint8_t** lin) {
    const vec_t mask = V_SET1_8(0x0f);
    const vec_t w12 = V_SET1_16(0x0201); /* unsigned bytes 1, 2: planes p+j, j = 0, 1 */
    const vec_t w1632 = V_SET1_16(0x2010); /* 16 and 32: the TH lookups of fused A8 */
    const int64_t tq = a8 ? 32 : 16;     /* table bytes per quad */
    for (int64_t m = 0; m < M; m++) {
        const int8_t* tr = T + m * tstride;
#if LUT_ISA == 2
        if (a8) { if (nt > TILES_PER_VEC) RUN_BODY(2, 1) else RUN_BODY(1, 1) }
        else if (nt > TILES_PER_VEC) RUN_BODY(2, 0) else RUN_BODY(1, 0)
#else
        /* two tiles per pass: with 4 tiles' accumulators gcc spilled them to the stack (a
         * store-forwarding chain per word); each pass reloads the tables from L1 */
        for (int t0 = 0; t0 < nt; t0 += 2) {
            const uint8_t* const* wp0 = wp;
            float* ACC0 = ACC;
            const int nt0 = nt;
            {
                const uint8_t* const* wp = wp0 + t0;
                float* ACC = ACC0 + t0 * M * 16;
                const int nt = nt0 - t0 >= 2 ? 2 : 1;
                if (a8) { if (nt == 2) RUN_BODY(2, 1) else RUN_BODY(1, 1) }
                else if (nt == 2) RUN_BODY(2, 0) else RUN_BODY(1, 0)
            }
        }
#endif
    }
}

/* ------------------------------------------------------------------ one activation row, state in registers */

/* Decode (M = 1, int8 tables of float or of int8 activations) runs a group's tiles from TILE to
 * STORE with ACC and YT in registers, in the lanes' order (c0: rows 0-3, 8-11; c1: rows 4-7,
 * 12-15, per tile): SCALE permutes its parameters into that order instead of permuting ACC to
 * rows and going through memory per run and per SCALE, and STORE permutes once. lut_plan marks
 * the tiles this covers (only LUTACC, SCALE, STORE: SHAPE_FAST). The float operations per row
 * are the general path's, in the same order, so results are bit-identical. FAST_TILES tiles per
 * pass (AVX2: two, 16 registers hold no more state). Per-call overhead that does not shrink with
 * the bits (dispatch, ACC permutes and memory round trips per LUTACC run and SCALE) was about
 * half of a 2-bit call's time (perf, weights in cache): 2-bit N = K = 4096, 1 thread, cache-hot,
 * C driver, AVX-512 0.18 -> 0.13 ms, AVX2 0.18-0.21 -> 0.15. */
#define FAST_TILES (2 * TILES_PER_VEC)
/* lut_plan's per-tile shape word: same-shape tiles from this one on (bits 0-7), SHAPE_FAST, and
 * from bit 16 the SCALE.pidx step between consecutive tiles of the group when every SCALE of
 * tile t has pidx = pidx(first tile) + t * step (0: not so; the fast path then reads each tile's
 * SCALE words, otherwise only the first tile's stream). */
#define SHAPE_TILES(x) ((int)((x) & 0xff))
#define SHAPE_FAST (1 << 8)
#define SHAPE_STEP(x) ((int64_t)((uint64_t)(x) >> 16))

#if LUT_ISA == 2
/* 16 floats per tile (tiles a, b) in the lanes' order of c0 (p0) and c1 (p1). */
static inline void param_lanes(const float* a, const float* b, fvec_t* p0, fvec_t* p1) {
    const __m512 va = _mm512_loadu_ps(a), vb = _mm512_loadu_ps(b);
    *p0 = perm64(va, _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), vb);
    *p1 = perm64(va, _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15), vb);
}
#define F_ZERO _mm512_setzero_ps
#define F_MUL _mm512_mul_ps
#define F_ADD _mm512_add_ps
#define F_SUB _mm512_sub_ps
#else
static inline void param_lanes(const float* a, const float* b, fvec_t* p0, fvec_t* p1) {
    (void)b;
    const __m256 r0 = _mm256_loadu_ps(a), r8 = _mm256_loadu_ps(a + 8);
    *p0 = _mm256_permute2f128_ps(r0, r8, 0x20);
    *p1 = _mm256_permute2f128_ps(r0, r8, 0x31);
}
#define F_ZERO _mm256_setzero_ps
#define F_MUL _mm256_mul_ps
#define F_ADD _mm256_add_ps
#define F_SUB _mm256_sub_ps
#endif

/* ACC and YT of the one-row path: in registers with AVX-512; in memory with AVX2, whose 16
 * registers then hold the word loop's accumulators and operands (with ACC and YT in registers
 * gcc spilled two quad-mode accumulators in the word loop, a store-forwarding chain per word:
 * 4-bit, 1 thread, weights in cache, ~10% slower than the general path). */
#if LUT_ISA == 2
#define FAST_STATE(NV)                                                                                \
    fvec_t c0[NV], c1[NV], y0[NV], y1[NV];                                                            \
    for (int v = 0; v < NV; v++) c0[v] = c1[v] = y0[v] = y1[v] = F_ZERO();
#define C_GET0(v) c0[v]
#define C_GET1(v) c1[v]
#define C_PUT(v, a, b) { c0[v] = (a); c1[v] = (b); }
#define Y_GET0(v) y0[v]
#define Y_GET1(v) y1[v]
#define Y_PUT(v, a, b) { y0[v] = (a); y1[v] = (b); }
#else
#define FAST_STATE(NV) float cm[NV][16] __attribute__((aligned(32))) = {{0}}, ym[NV][16] __attribute__((aligned(32))) = {{0}};
#define C_GET0(v) _mm256_load_ps(cm[v])
#define C_GET1(v) _mm256_load_ps(cm[v] + 8)
#define C_PUT(v, a, b) { _mm256_store_ps(cm[v], (a)); _mm256_store_ps(cm[v] + 8, (b)); }
#define Y_GET0(v) _mm256_load_ps(ym[v])
#define Y_GET1(v) _mm256_load_ps(ym[v] + 8)
#define Y_PUT(v, a, b) { _mm256_store_ps(ym[v], (a)); _mm256_store_ps(ym[v] + 8, (b)); }
#endif

/* The word loop's share of the linear prefetch: a word of nt tiles is nt * 32 bytes (<= 128). */
#define PF_WORD(at, nt)                                                                               \
    { _mm_prefetch((const char*)(at), LIN_HINT); if ((nt) > 2) _mm_prefetch((const char*)(at) + 64, LIN_HINT); }

#define FAST_BODY(NV, A8)                                                                             \
    {                                                                                                 \
        const int64_t tq = A8 ? 32 : 16; /* table bytes per quad */                                   \
        FAST_STATE(NV)                                                                                \
        for (int64_t rel = 1;; rel++) {                                                               \
            const uint64_t w = s[tile[0] + rel];                                                      \
            const int op = (int)(w & 0xff);                                                           \
            if (op == OP_LUTACC) {                                                                    \
                const int quad = FIELD(w, 8, 1) == 0, plane = (int)FIELD(w, 9, 4);                    \
                const int64_t kg0 = FIELD(w, 13, 20);                                                 \
                const int nwords = (int)FIELD(w, 33, 7) + 1;                                          \
                if (!lin) prefetch_span(wq, nt, 32 * (int64_t)nwords);                                \
                vec_t a_lo[NV], a_hi[NV], b_lo[NV], b_hi[NV];                                         \
                for (int v = 0; v < NV; v++) a_lo[v] = a_hi[v] = b_lo[v] = b_hi[v] = V_ZERO();       \
                const int fused = A8 && nwords <= A8_FUSED_WORDS;                                    \
                if (A8 && fused) {                                                                    \
                    if (lin) RUN_WORDS_Q(NV, A8, 1, PF_WORD(lin + (int64_t)w * nt * 32, nt))          \
                    else RUN_WORDS_Q(NV, A8, 1, (void)0)                                              \
                } else {                                                                              \
                    if (lin) RUN_WORDS_Q(NV, A8, 0, PF_WORD(lin + (int64_t)w * nt * 32, nt))          \
                    else RUN_WORDS_Q(NV, A8, 0, (void)0)                                              \
                }                                                                                     \
                if (lin) lin += 32 * (int64_t)nwords * nt;                                            \
                /* after the word loop: with AVX2 two more live registers spilled its accumulators */ \
                const fvec_t ts = F_SET1(TS[FIELD(w, 40, 20)]);                                       \
                const vec_t pw = V_SET1_32((int)((1u << plane) | ((quad ? 1u << (plane + 2) : 1u << plane) << 16))); \
                for (int v = 0; v < NV; v++) {                                                        \
                    WIDEN_RUN(v, A8, l0x, l1x)                                                        \
                    fvec_t a0 = C_GET0(v), a1 = C_GET1(v);                                            \
                    F_ACC(a0, l0x, ts);                                                               \
                    F_ACC(a1, l1x, ts);                                                               \
                    C_PUT(v, a0, a1)                                                                  \
                }                                                                                     \
                for (int t = 0; t < nt; t++) wq[t] += 32 * (int64_t)nwords;                           \
            } else if (op == OP_SCALE) {                                                              \
                const int64_t b0 = FIELD(w, 8, 20), nb = FIELD(w, 28, 8) + 1;                         \
                float xsv = XS[b0];                                                                   \
                for (int64_t b = b0 + 1; b < b0 + nb; b++) xsv = xsv + XS[b];                         \
                const fvec_t xs = F_SET1(xsv);                                                        \
                const float* blk[FAST_TILES];                                                         \
                const int64_t i0 = (int64_t)FIELD(w, 36, 28);                                         \
                for (int t = 0; t < nt; t++)                                                          \
                    blk[t] = P + 32 * (step ? i0 + t * step : (int64_t)FIELD(s[tile[t] + rel], 36, 28)); \
                if (plin) prefetch_lin(&plin, 128 * nt);                                              \
                else                                                                                  \
                    for (int t = 0; t < nt; t++) {                                                    \
                        _mm_prefetch((const char*)(blk[t] + 32 * PARAM_PREFETCH), _MM_HINT_T0);       \
                        _mm_prefetch((const char*)(blk[t] + 32 * PARAM_PREFETCH) + 64, _MM_HINT_T0);  \
                    }                                                                                 \
                if (!step)                                                                            \
                    for (int t = 1; t < nt; t++) _mm_prefetch((const char*)(s + tile[t] + rel + STREAM_PREFETCH), _MM_HINT_T0); \
                for (int v = 0; v < NV; v++) {                                                        \
                    const float* ba = blk[TILES_PER_VEC * v];                                         \
                    const float* bb = blk[TILES_PER_VEC * v + 1 < nt ? TILES_PER_VEC * v + 1 : TILES_PER_VEC * v]; \
                    fvec_t s0, s1, o0, o1;                                                            \
                    param_lanes(ba, bb, &s0, &s1);                                                    \
                    param_lanes(ba + 16, bb + 16, &o0, &o1);                                          \
                    Y_PUT(v, F_ADD(Y_GET0(v), F_SUB(F_MUL(C_GET0(v), s0), F_MUL(o0, xs))),           \
                          F_ADD(Y_GET1(v), F_SUB(F_MUL(C_GET1(v), s1), F_MUL(o1, xs))))               \
                    C_PUT(v, F_ZERO(), F_ZERO())                                                      \
                }                                                                                     \
            } else { /* OP_STORE (SHAPE_FAST: nothing else) */                                        \
                float rows[FAST_TILES * 16];                                                          \
                for (int v = 0; v < NV; v++) lanes_to_acc(Y_GET0(v), Y_GET1(v), v, nt, 1, 0, rows);    \
                for (int t = 0; t < nt; t++) {                                                        \
                    const uint64_t wt = s[tile[t] + rel];                                             \
                    memcpy(Y + FIELD(wt, 8, 32), rows + 16 * t, sizeof(float) * (FIELD(wt, 40, 5) + 1)); \
                }                                                                                     \
                return;                                                                               \
            }                                                                                         \
        }                                                                                             \
    }

/* nt <= FAST_TILES same-shape SHAPE_FAST tiles for one activation row (Y: that row; tr, TS, XS:
 * its tables, table scales and sums; a8: tables of int8 activations, TH then TL per quad). step: SHAPE_STEP. Prefetches the weights and parameters of the nt
 * tiles after these in address order when the tiles' are laid out one after the other. */
static void run_tiles_fast(const uint64_t* s, const int64_t* tile, int nt, int64_t step, const uint8_t* W,
                           const float* P, float* Y, const int8_t* tr, int a8, const float* TS, const float* XS) {
    const vec_t mask = V_SET1_8(0x0f);
    const vec_t w12 = V_SET1_16(0x0201);
    const vec_t w1632 = V_SET1_16(0x2010);
    const uint8_t* wq[FAST_TILES];
    for (int t = 0; t < nt; t++) wq[t] = W + 32 * (int64_t)FIELD(s[tile[t]], 8, 56);
    const uint8_t *lin = NULL, *plin = NULL;
    if (nt > 1) {
        const int64_t d = wq[1] - wq[0];
        int ok = d > 0;
        for (int t = 2; t < nt; t++) ok &= wq[t] - wq[t - 1] == d;
        if (ok) lin = wq[0] + LIN_AHEAD * nt * d;
        if (step) { /* the first SCALE's block of tile 0, then nt tiles on */
            for (int64_t rel = 1; (s[tile[0] + rel] & 0xff) != OP_STORE; rel++)
                if ((s[tile[0] + rel] & 0xff) == OP_SCALE) {
                    plin = (const uint8_t*)(P + 32 * ((int64_t)FIELD(s[tile[0] + rel], 36, 28) + LIN_AHEAD * nt * step));
                    break;
                }
        }
    }
    if (a8) { if (nt > TILES_PER_VEC) FAST_BODY(2, 1) else FAST_BODY(1, 1) }
    else if (nt > TILES_PER_VEC) FAST_BODY(2, 0) else FAST_BODY(1, 0)
}

/* ------------------------------------------------------------------ binary-coded planes (BCQACC) */

/* Float plane weights (BCQMUL kind 1) for one tile: the int16 per-row, per-plane sums `a`
 * (lo: rows 0-3 and 8-11, hi: rows 4-7 and 12-15, two planes per row, as the lookups left
 * them) times TS, times the row's float weight of each plane, added in plane order. */
static void bcq_float_rows(const int16_t* alo, const int16_t* ahi, const float* wts, float tsv, float* acc) {
    for (int r = 0; r < 16; r++) {
        const int16_t* a = ((r >> 2) & 1 ? ahi : alo) + 8 * (r >> 3) + 2 * (r & 3);
        acc[r] = acc[r] + ((float)a[0] * tsv) * wts[2 * r];
        acc[r] = acc[r] + ((float)a[1] * tsv) * wts[2 * r + 1];
    }
}

/* NV vectors of tiles, one activation row m, plane pair q: pair-mode words (lo nibbles quad kg,
 * hi nibbles quad kg+1; byte 2r+j = plane j of the pair). The two lookups of a byte position are
 * interleaved and summed into one int16 lane per (row, plane) (at most 64 x 2 x 127 < 2^15), so
 * the two planes stay apart; kind 0 then weighs them by their int16 powers of two into int32 row
 * sums (vpmaddwd: an integer shift per plane, no float multiply), added over the pairs (int32,
 * wrapping; code generation keeps them in range) and converted once per instruction. */
#define BCQ_BODY(NV)                                                                                  \
    {                                                                                                 \
        vec_t s_lo[NV], s_hi[NV];                                                                     \
        for (int v = 0; v < NV; v++) s_lo[v] = s_hi[v] = V_ZERO();                                   \
        for (int q = 0; q < npairs; q++) {                                                            \
            const int64_t base = 32 * (int64_t)q * nwords;                                            \
            vec_t a_lo[NV], a_hi[NV];                                                                 \
            for (int v = 0; v < NV; v++) a_lo[v] = a_hi[v] = V_ZERO();                               \
            for (int w = 0; w < nwords; w++) {                                                        \
                const int64_t k0 = kg0 + 2 * w;                                                       \
                const vec_t t0 = V_TABLE(tr + k0 * 16), t1 = V_TABLE(tr + (k0 + 1) * 16);             \
                for (int v = 0; v < NV; v++) {                                                        \
                    const vec_t x = load_word(wp, v, nt, base + 32 * (int64_t)w);                     \
                    const vec_t l0 = V_SHUF(t0, V_AND(x, mask)), l1 = V_SHUF(t1, V_AND(V_SRLI16(x, 4), mask)); \
                    a_lo[v] = V_ADD16(a_lo[v], V_MADDUBS(ones, V_UNPACKLO8(l0, l1)));                 \
                    a_hi[v] = V_ADD16(a_hi[v], V_MADDUBS(ones, V_UNPACKHI8(l0, l1)));                 \
                }                                                                                     \
            }                                                                                         \
            for (int v = 0; v < NV; v++) {                                                            \
                if (!kind[q]) {                                                                       \
                    s_lo[v] = V_ADD32(s_lo[v], V_MADD(a_lo[v], load_word(mul[q], v, nt, 0)));         \
                    s_hi[v] = V_ADD32(s_hi[v], V_MADD(a_hi[v], load_word(mul[q], v, nt, 32)));        \
                    continue;                                                                         \
                }                                                                                     \
                int16_t lo16[TILES_PER_VEC * 16], hi16[TILES_PER_VEC * 16];                           \
                V_STORE(lo16, a_lo[v]);                                                               \
                V_STORE(hi16, a_hi[v]);                                                               \
                for (int h = 0; h < TILES_PER_VEC && TILES_PER_VEC * v + h < nt; h++) {               \
                    const int t = TILES_PER_VEC * v + h;                                              \
                    bcq_float_rows(lo16 + 16 * h, hi16 + 16 * h, (const float*)mul[q][t], tsv,        \
                                   ACC + (t * M + m) * 16);                                           \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        if (any_int)                                                                                  \
            for (int v = 0; v < NV; v++) add_parts(s_lo[v], s_hi[v], v, nt, M, m, tsv, ACC);         \
    }

/* One BCQACC for nt <= GROUP_TILES tiles (wp: each tile's next weight word; mul[q]: each tile's
 * BCQMUL record of pair q, kind[q] its kind). Float-weighted pairs are added to ACC as they come,
 * the int32 total of the int16-weighted pairs after the last pair. */
static void group_bcqacc(const uint8_t* const* wp, const uint8_t* const (*mul)[GROUP_TILES], const int* kind,
                         int npairs, int nt, int nwords, int64_t kg0, const int8_t* T, int64_t tstride,
                         const float* TS, int64_t tsstride, int64_t M, float* ACC) {
    const vec_t mask = V_SET1_8(0x0f);
    const vec_t ones = V_SET1_8(1);
    const int nv = (nt + TILES_PER_VEC - 1) / TILES_PER_VEC;
    int any_int = 0;
    for (int q = 0; q < npairs; q++) any_int |= !kind[q];
    for (int64_t m = 0; m < M; m++) {
        const int8_t* tr = T + m * tstride;
        const float tsv = TS[m * tsstride];
        switch (nv) {
        case 4: BCQ_BODY(4) break;
        case 3: BCQ_BODY(3) break;
        case 2: BCQ_BODY(2) break;
        default: BCQ_BODY(1) break;
        }
    }
}

/* YT = YT + (ACC * s - so * xs); ACC = 0 for one tile's 16 rows (the spec's order, per lane). */
static inline void scale_rows(float* y, float* a, const float* blk, float xs) {
#if LUT_ISA == 2
    const __m512 t2 = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(blk));
    const __m512 t3 = _mm512_mul_ps(_mm512_loadu_ps(blk + 16), _mm512_set1_ps(xs));
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), _mm512_sub_ps(t2, t3)));
    _mm512_storeu_ps(a, _mm512_setzero_ps());
#else
    const __m256 vxs = _mm256_set1_ps(xs);
    for (int h = 0; h < 16; h += 8) {
        const __m256 t2 = _mm256_mul_ps(_mm256_loadu_ps(a + h), _mm256_loadu_ps(blk + h));
        const __m256 t3 = _mm256_mul_ps(_mm256_loadu_ps(blk + 16 + h), vxs);
        _mm256_storeu_ps(y + h, _mm256_add_ps(_mm256_loadu_ps(y + h), _mm256_sub_ps(t2, t3)));
        _mm256_storeu_ps(a + h, _mm256_setzero_ps());
    }
#endif
}

/* Runs nt same-shape tiles (TILE words at s[tile[t]]) with int8 tables (a8: of int8 activations);
 * acc, yt: [nt][M][16]. */
static void run_group(const uint64_t* s, const int64_t* tile, int nt, const plan_t* p, const uint8_t* W,
                      const float* P, const outlier_t* O, const float* X, int64_t M, float* Y, const int8_t* tables,
                      int64_t tstride, int a8, const float* TS, const float* XS, float* acc, float* yt) {
    const uint8_t* wp[GROUP_TILES];
    const uint8_t* mul[BCQ_SLOTS][GROUP_TILES] = {{0}}; /* each tile's BCQMUL record per slot */
    int mulkind[BCQ_SLOTS] = {0};
    for (int t = 0; t < nt; t++) wp[t] = W + 32 * (int64_t)FIELD(s[tile[t]], 8, 56);
    const uint8_t* wlin = NULL; /* the next group's weights, prefetched in address order (LIN_AHEAD) */
    const uint8_t* plin = NULL; int pdone = nt < 2;
    if (nt > 1) {
        const int64_t d = wp[1] - wp[0];
        int ok = d > 0;
        for (int t = 2; t < nt; t++) ok &= wp[t] - wp[t - 1] == d;
        if (ok) wlin = wp[0] + nt * d;
    }
    memset(acc, 0, sizeof(float) * 16 * M * nt);
    memset(yt, 0, sizeof(float) * 16 * M * nt);
    for (int64_t rel = 1;; rel++) {
        const uint64_t w = s[tile[0] + rel];
        switch ((int)(w & 0xff)) {
        case OP_LUTACC: { /* the run of LUTACCs up to the next other instruction, ACC in registers */
            int count = 1;
            int64_t words = (int64_t)FIELD(w, 33, 7) + 1;
            for (uint64_t u; ((u = s[tile[0] + rel + count]) & 0xff) == OP_LUTACC; count++)
                words += (int64_t)FIELD(u, 33, 7) + 1;
            group_lutacc_run(wp, nt, s + tile[0] + rel, count, tables, tstride, a8, TS, p->blocks, M, acc,
                             wlin ? &wlin : NULL);
            for (int t = 0; t < nt; t++) wp[t] += 32 * words;
            rel += count - 1;
            break;
        }
        case OP_BCQMUL: { /* same word in every tile of the group (same_shape) */
            const int slot = (int)FIELD(w, 8, 2);
            mulkind[slot] = (int)FIELD(w, 10, 1);
            for (int t = 0; t < nt; t++) {
                mul[slot][t] = wp[t];
                wp[t] += 32 * (mulkind[slot] ? BCQ_FLOAT_WORDS : BCQ_INT_WORDS);
            }
            break;
        }
        case OP_BCQACC: {
            const int npairs = (int)FIELD(w, 8, 2) + 1, nwords = (int)FIELD(w, 30, 6) + 1;
            prefetch_span(wp, nt, 32 * (int64_t)npairs * nwords);
            group_bcqacc(wp, (const uint8_t* const (*)[GROUP_TILES])mul, mulkind, npairs, nt, nwords, FIELD(w, 10, 20),
                         tables, tstride, TS + FIELD(w, 36, 20), p->blocks, M, acc);
            for (int t = 0; t < nt; t++) wp[t] += 32 * (int64_t)npairs * nwords;
            break;
        }
        case OP_SCALE: {
            const int64_t b0 = FIELD(w, 8, 20), nb = FIELD(w, 28, 8) + 1;
            if (!pdone) {
                const int64_t i0 = (int64_t)FIELD(s[tile[0] + rel], 36, 28), d = (int64_t)FIELD(s[tile[1] + rel], 36, 28) - i0;
                int ok = d > 0;
                for (int t = 2; t < nt; t++) ok &= (int64_t)FIELD(s[tile[t] + rel], 36, 28) - (int64_t)FIELD(s[tile[t - 1] + rel], 36, 28) == d;
                if (ok) plin = (const uint8_t*)(P + 32 * (i0 + nt * d));
                pdone = 1;
            }
            if (plin) prefetch_lin(&plin, 128 * nt);
            for (int t = 0; t < nt; t++) {
                if (!plin) {
                    const char* next = (const char*)(P + 32 * ((int64_t)FIELD(s[tile[t] + rel], 36, 28) + PARAM_PREFETCH));
                    _mm_prefetch(next, _MM_HINT_T0);
                    _mm_prefetch(next + 64, _MM_HINT_T0);
                }
                _mm_prefetch((const char*)(s + tile[t] + rel + STREAM_PREFETCH), _MM_HINT_T0);
            }
            for (int64_t m = 0; m < M; m++) {
                float xs = XS[m * p->blocks + b0];
                for (int64_t b = b0 + 1; b < b0 + nb; b++) xs = xs + XS[m * p->blocks + b];
                for (int t = 0; t < nt; t++)
                    scale_rows(yt + (t * M + m) * 16, acc + (t * M + m) * 16,
                               P + 32 * (int64_t)FIELD(s[tile[t] + rel], 36, 28), xs);
            }
            break;
        }
        case OP_OUTLIER:
            for (int t = 0; t < nt; t++) {
                const uint64_t wt = s[tile[t] + rel];
                const int64_t start = FIELD(wt, 8, 36), count = FIELD(wt, 44, 20) + 1;
                float* ytt = yt + t * M * 16;
                for (int64_t m = 0; m < M; m++)
                    for (int64_t o = start; o < start + count; o++)
                        ytt[m * 16 + O[o].row] = ytt[m * 16 + O[o].row] + O[o].val * X[m * p->kpad + O[o].col];
            }
            break;
        case OP_STORE:
            for (int t = 0; t < nt; t++) {
                const uint64_t wt = s[tile[t] + rel];
                const int64_t row0 = FIELD(wt, 8, 32), nrows = FIELD(wt, 40, 5) + 1;
                for (int64_t m = 0; m < M; m++)
                    memcpy(Y + m * p->n + row0, yt + (t * M + m) * 16, sizeof(float) * nrows);
            }
            return;
        default:
            return; /* unreachable after validation */
        }
    }
}

/* Whether a tile runs on the fast path (run_tiles_fast): only LUTACC and SCALE before its STORE. */
static int fast_shape(const uint64_t* s, int64_t tile) {
    for (int64_t i = tile + 1;; i++) {
        const int op = (int)(s[i] & 0xff);
        if (op == OP_STORE) return 1;
        if (op != OP_LUTACC && op != OP_SCALE) return 0;
    }
}

/* SHAPE_STEP of n same-shape tiles: d > 0 if every SCALE of tile t has pidx = that of tile 0 + t d. */
static int64_t pidx_step(const uint64_t* s, const int64_t* tile, int n) {
    int64_t d = 0;
    if (n < 2) return 0;
    for (int64_t rel = 1; (s[tile[0] + rel] & 0xff) != OP_STORE; rel++) {
        if ((s[tile[0] + rel] & 0xff) != OP_SCALE) continue;
        const int64_t i0 = (int64_t)FIELD(s[tile[0] + rel], 36, 28);
        if (!d) d = (int64_t)FIELD(s[tile[1] + rel], 36, 28) - i0;
        if (d <= 0) return 0;
        for (int t = 1; t < n; t++)
            if ((int64_t)FIELD(s[tile[t] + rel], 36, 28) != i0 + t * d) return 0;
    }
    return d;
}

/* Validates a stream against its operands' sizes and outlier records (they index X and YT),
 * and writes the positions of its TABLE instructions, then of its TILE instructions, to pos
 * (room for nw entries); counts[0], counts[1] = their numbers. After them, per tile g, its shape
 * word: the number of same-shape tiles starting at g (at most GROUP_TILES; same_shape), SHAPE_FAST
 * and SHAPE_STEP (run_tiles_fast), which lut_exec_tables reads instead of comparing every tile's
 * words on every call (about 10% of a 2-bit N = K = 4096 call when the weights are in cache): a
 * stream has more than ntables + 2 nsegs words (each tile has a TILE and a STORE), so they fit.
 * Returns 0 or (word << 8) | error. */
int64_t lut_plan(const uint64_t* s, int64_t nw, int64_t wbytes, int64_t pfloats, const void* O, int64_t nout,
                 int64_t* pos, int64_t* counts) {
    if (wbytes % 32 || pfloats % 32) return fail(0, ERR_ARGS);
    plan_t p = {0};
    int64_t err = validate(s, nw, wbytes / 32, pfloats / 32, nout, &p);
    for (int64_t o = 0; !err && o < nout; o++) {
        const outlier_t* r = (const outlier_t*)O + o;
        if (r->row < 0 || r->row >= 16 || r->col < 0 || r->col >= p.kpad) err = fail(0, ERR_OUTLIER);
    }
    if (!err) {
        memcpy(pos, p.tables, sizeof(int64_t) * p.ntables);
        memcpy(pos + p.ntables, p.segs, sizeof(int64_t) * p.nsegs);
        for (int64_t g = 0; g < p.nsegs; g++) {
            int n = p.nsegs - g < GROUP_TILES ? (int)(p.nsegs - g) : GROUP_TILES;
            while (n > 1 && !same_shape(s, p.segs + g, n)) n--;
            pos[p.ntables + p.nsegs + g] = n | (fast_shape(s, p.segs[g]) ? SHAPE_FAST : 0)
                                           | pidx_step(s, p.segs + g, n) << 16;
        }
        counts[0] = p.ntables;
        counts[1] = p.nsegs;
    }
    free(p.tables);
    free(p.segs);
    free(p.built);
    free(p.covered);
    free(p.stored);
    return err;
}

/* ------------------------------------------------------------------ work splitting */

/* A parallel launcher with the signature of TVM's TVMBackendParallelLaunch (c_backend_api.h):
 * runs flambda(task_id, env, cdata) for task_id in [0, env->num_task) on the caller's thread
 * pool (num_task 0 = the pool's size). Hosted by tvm-llvm kernels, the engine runs on TVM's
 * pool instead of a second pool (the engine's own) that would fight it for the same cores. */
typedef struct { void* sync_handle; int32_t num_task; } par_env_t;
typedef int (*par_lambda_t)(int task_id, par_env_t* env, void* cdata);
typedef int (*par_launch_t)(par_lambda_t flambda, void* cdata, int num_task);

typedef struct {
    const uint64_t* s; const int64_t* pos; int64_t ntables, nsegs;
    const uint8_t* W; const float* P; const outlier_t* O; const float* X; int64_t M; float* Y; int fp32, a8;
    plan_t p; void* tables; int64_t tstride; float *TS, *XS;
    int oom;
    int64_t next; /* first tile not yet handed out (segments_task) */
} job_t;

static void split(int64_t n, int task, int ntask, int64_t* begin, int64_t* end) {
    const int64_t q = n / ntask, r = n % ntask;
    *begin = task * q + (task < r ? task : r);
    *end = *begin + q + (task < r ? 1 : 0);
}

static void tables_range(job_t* j, int64_t begin, int64_t end) { /* over (TABLE instruction, row) pairs */
    for (int64_t i = begin; i < end; i++) {
        const int64_t t = i / j->M, m = i % j->M;
        const uint64_t w = j->s[j->pos[t]];
        const int64_t g = FIELD(w, 8, 20);
        if (j->a8)
            build_table_a8(j->X, j->p.kpad, m, FIELD(w, 28, 20), FIELD(w, 48, 16) + 1, j->tables, j->tstride,
                           j->TS + m * j->p.blocks + g, j->XS + m * j->p.blocks + g);
        else
            build_table(j->X, j->p.kpad, m, FIELD(w, 28, 20), FIELD(w, 48, 16) + 1, j->fp32, j->tables, j->tstride,
                        j->TS + m * j->p.blocks + g, j->XS + m * j->p.blocks + g);
    }
}

static void segments_range(job_t* j, int64_t begin, int64_t end) {
    if (begin >= end) return;
    const size_t bytes = (size_t)(64 * ((GROUP_TILES * j->M * 16 * 4 + 63) / 64));
    float* acc = aligned_alloc(64, bytes);
    float* yt = aligned_alloc(64, bytes);
    const int64_t* tile = j->pos + j->ntables;
    const int64_t* same = tile + j->nsegs; /* lut_plan: same-shape tiles from each tile on */
    if (!acc || !yt) __atomic_store_n(&j->oom, 1, __ATOMIC_RELAXED);
    else
        for (int64_t g = begin; g < end;) {
            int nt = 1;
            if (!j->fp32) /* the longest run of same-shape tiles that fits a group */
                nt = (int)(SHAPE_TILES(same[g]) < end - g ? SHAPE_TILES(same[g]) : end - g);
            nt = nt < 1 ? 1 : nt > GROUP_TILES ? GROUP_TILES : nt; /* acc, yt hold GROUP_TILES tiles */
            if (!j->fp32 && j->M == 1 && (same[g] & SHAPE_FAST))
                for (int t0 = 0; t0 < nt; t0 += FAST_TILES)
                    run_tiles_fast(j->s, tile + g + t0, nt - t0 < FAST_TILES ? nt - t0 : FAST_TILES,
                                   SHAPE_STEP(same[g]), j->W, j->P, j->Y, j->tables, j->a8, j->TS, j->XS);
            else if (j->fp32)
                run_segment(j->s, tile[g], &j->p, j->W, j->P, j->O, j->X, j->M, j->Y, j->tables, j->tstride,
                            j->XS, acc, yt);
            else
                run_group(j->s, tile + g, nt, &j->p, j->W, j->P, j->O, j->X, j->M, j->Y, j->tables, j->tstride,
                          j->a8, j->TS, j->XS, acc, yt);
            g += nt;
        }
    free(acc);
    free(yt);
}

static int tables_task(int task, par_env_t* env, void* cdata) {
    job_t* j = cdata;
    int64_t b, e;
    split(j->ntables * j->M, task, env->num_task, &b, &e);
    tables_range(j, b, e);
    return 0;
}

/* Tiles are handed out in chunks from a shared counter, not split in fixed shares: on a shared
 * machine one descheduled thread would otherwise hold up the call for its whole share. */
static int segments_task(int task, par_env_t* env, void* cdata) {
    job_t* j = cdata;
    (void)task;
    int64_t chunk = j->nsegs / (8 * (int64_t)(env->num_task > 0 ? env->num_task : 1));
    chunk = chunk < GROUP_TILES ? GROUP_TILES : chunk - chunk % GROUP_TILES;
    for (;;) {
        const int64_t b = __atomic_fetch_add(&j->next, chunk, __ATOMIC_RELAXED);
        if (b >= j->nsegs) return 0;
        segments_range(j, b, b + chunk < j->nsegs ? b + chunk : j->nsegs);
    }
}

/* ------------------------------------------------------------------ the engine's thread pool */

/* Calls without a host launcher run on this pool instead of OpenMP: the engine then shares no
 * libgomp (torch's) whose wait policy is fixed when torch loads it, and whose spinning workers
 * made 2-thread calls 5-10x slower than 1-thread ones on a busy machine. Workers spin briefly for
 * the next call (decode calls come back-to-back), then sleep on a futex. The caller takes part;
 * work is handed out in chunks from shared counters, so a worker that is slow to wake only
 * costs the share it actually took. One call uses the pool at a time: a concurrent caller runs
 * on its own thread (the result does not depend on the split). */
#define POOL_MAX 64
#ifndef POOL_SPIN
#define POOL_SPIN 4096    /* pause iterations a waiting thread spins before it sleeps (~0.1 ms) */
#endif
#define POOL_SHARED_TABLES 256 /* (TABLE, row) pairs below which the caller builds every table */
#define POOL_CLOSED 0x80000000u

typedef struct {
    job_t* j;
    int ntask;
    int64_t next_table, tables_done; /* table work: next (TABLE, row) pair handed out, pairs built */
} pool_job_t;

static struct {
    pthread_mutex_t lock; /* held by the call using the pool */
    pid_t pid;            /* process whose workers these are (a forked child has none) */
    int size;             /* workers started */
    uint32_t gen;         /* futex word: bumped for each call */
    uint32_t state;       /* futex word: POOL_CLOSED | workers inside the call */
    int limit;            /* workers the current call takes */
    pool_job_t* job;
} pool = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, POOL_CLOSED, 0, NULL};

static void futex_wait(uint32_t* addr, uint32_t val) { syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0); }
static void futex_wake(uint32_t* addr) { syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0); }

/* Spins, then yields, until *addr != val (a value another participant is about to change). */
static void wait_change(const int64_t* addr, int64_t val) {
    for (int i = 0; __atomic_load_n(addr, __ATOMIC_ACQUIRE) == val; i++)
        if (i < POOL_SPIN) _mm_pause(); else sched_yield();
}

static void pool_work(pool_job_t* pj, int caller) {
    job_t* j = pj->j;
    const int64_t total = j->ntables * j->M;
    int64_t chunk = total / (4 * (int64_t)pj->ntask);
    chunk = chunk < 1 ? 1 : chunk;
    /* few tables (decode: microseconds' work): the caller builds them all, so a worker that is
     * descheduled holding a share of them cannot hold up every thread at the barrier below */
    if (total < POOL_SHARED_TABLES) chunk = caller ? total : 0;
    for (; chunk;) { /* tables, then (once every table is built) tiles */
        const int64_t b = __atomic_fetch_add(&pj->next_table, chunk, __ATOMIC_RELAXED);
        if (b >= total) break;
        const int64_t e = b + chunk < total ? b + chunk : total;
        tables_range(j, b, e);
        __atomic_fetch_add(&pj->tables_done, e - b, __ATOMIC_RELEASE);
    }
    for (int64_t done; (done = __atomic_load_n(&pj->tables_done, __ATOMIC_ACQUIRE)) < total;) wait_change(&pj->tables_done, done);
    par_env_t env = {NULL, pj->ntask};
    segments_task(0, &env, j);
}

static void* pool_worker(void* arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg;
    for (;;) {
        uint32_t g;
        for (int i = 0; (g = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE)) == seen; i++)
            if (i < POOL_SPIN) _mm_pause(); else futex_wait(&pool.gen, seen);
        seen = g;
        uint32_t v = __atomic_load_n(&pool.state, __ATOMIC_RELAXED);
        while (!(v & POOL_CLOSED)) /* join the call unless it is over */
            if (__atomic_compare_exchange_n(&pool.state, &v, v + 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                if ((int)v < pool.limit) pool_work(pool.job, 0);
                if (__atomic_sub_fetch(&pool.state, 1, __ATOMIC_RELEASE) == POOL_CLOSED) futex_wake(&pool.state);
                break;
            }
    }
    return NULL;
}

/* Starts workers up to `want`; returns how many there are. Caller holds pool.lock. */
static int pool_grow(int want) {
    if (pool.pid != getpid()) { pool.pid = getpid(); pool.size = 0; } /* forked: the parent's workers stay there */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* workers inherit it: signals go to the caller's threads */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (pthread_t t; pool.size < want && pool.size < POOL_MAX; pool.size++)
        if (pthread_create(&t, &attr, pool_worker, (void*)(uintptr_t)pool.gen)) break;
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.size;
}

static int cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set)) return 1;
    const int n = CPU_COUNT(&set);
    return n > 0 ? n : 1;
}

/* Runs job j on `threads` threads (0: one per CPU this process may use), the caller included. */
static void pool_run(job_t* j, int threads) {
    if (threads <= 0) threads = cpu_count();
    if (threads > POOL_MAX + 1) threads = POOL_MAX + 1;
    int workers = 0;
    if (threads > 1 && !pthread_mutex_trylock(&pool.lock)) {
        workers = pool_grow(threads - 1);
        if (!workers) pthread_mutex_unlock(&pool.lock);
    }
    pool_job_t pj = {j, workers + 1, 0, 0};
    if (!workers) { /* the pool is busy with another call (or has no threads): this thread alone */
        tables_range(j, 0, j->ntables * j->M);
        segments_range(j, 0, j->nsegs);
        return;
    }
    pool.job = &pj;
    pool.limit = workers;
    __atomic_store_n(&pool.state, 0, __ATOMIC_RELEASE); /* open: workers may join */
    __atomic_add_fetch(&pool.gen, 1, __ATOMIC_RELEASE);
    futex_wake(&pool.gen);
    pool_work(&pj, 1);
    /* close the call, then wait for the workers that joined it (they use pj and j) */
    uint32_t v = __atomic_or_fetch(&pool.state, POOL_CLOSED, __ATOMIC_ACQ_REL);
    for (int i = 0; v != POOL_CLOSED; i++, v = __atomic_load_n(&pool.state, __ATOMIC_ACQUIRE))
        if (i < POOL_SPIN) _mm_pause(); else futex_wait(&pool.state, v);
    pthread_mutex_unlock(&pool.lock);
}

/* Whether a validated stream has binary-coded-plane instructions (they take float activations). */
static int has_bcq(const uint64_t* s, const int64_t* tile, int64_t nsegs) {
    for (int64_t t = 0; t < nsegs; t++)
        for (int64_t i = tile[t] + 1; (s[i] & 0xff) != OP_STORE; i++)
            if ((s[i] & 0xff) == OP_BCQMUL || (s[i] & 0xff) == OP_BCQACC) return 1;
    return 0;
}

/* Runs a stream that lut_plan accepted (with the same operand sizes). X: [M, Kpad] float32;
 * Y: [M, N] float32, zero on entry. kind: TABLES_INT8, TABLES_FP32 or TABLES_A8. threads: 1 = this thread only; otherwise the tables, then
 * the tiles, are split over `launch` (if not NULL: all of its pool) or the engine's pool (0 = one
 * thread per CPU).
 * Tiles are independent (validate() refuses two STOREs of one row) and each table is built by one
 * task over quads no other TABLE touches, so the result does not depend on the split.
 * Returns 0, ERR_MEMORY, or ERR_LAUNCH if the launcher failed. */
int64_t lut_exec_tables(const uint64_t* s, const int64_t* pos, int64_t ntables, int64_t nsegs, const uint8_t* W,
                        const float* P, const void* O, const float* X, int64_t M, float* Y, int kind, int threads,
                        void* launch) {
    if (kind < TABLES_INT8 || kind > TABLES_A8) return fail(0, ERR_ARGS);
    if (kind == TABLES_A8 && has_bcq(s, pos + ntables, nsegs)) return fail(0, ERR_ARGS);
    job_t j = {0};
    j.s = s; j.pos = pos; j.ntables = ntables; j.nsegs = nsegs; j.W = W; j.P = P; j.O = (const outlier_t*)O;
    j.X = X; j.M = M; j.Y = Y; j.fp32 = kind == TABLES_FP32; j.a8 = kind == TABLES_A8;
    j.p.n = (int64_t)(s[2] & 0xffffffffULL);
    j.p.kpad = (int64_t)(s[2] >> 32);
    j.p.kg = j.p.kpad / 4;
    j.p.blocks = (int64_t)s[3];
    j.tstride = (j.p.kg + 1) * 16 * (j.a8 ? 2 : 1);  /* entries per row (bytes: int8 kinds) */
    j.tables = calloc((size_t)(M * j.tstride), j.fp32 ? 4 : 1); /* quads no TABLE builds read as zeros */
    j.TS = calloc((size_t)(M * j.p.blocks), sizeof(float));  /* blocks no TABLE builds: scale 0, sum 0 */
    j.XS = calloc((size_t)(M * j.p.blocks), sizeof(float));
    int64_t err = 0;
    if (!j.tables || !j.TS || !j.XS) {
        __atomic_store_n(&j.oom, 1, __ATOMIC_RELAXED);
    } else if (threads == 1) {
        tables_range(&j, 0, ntables * M);
        segments_range(&j, 0, nsegs);
    } else if (launch) {
        /* num_task 0: the pool as the host sized it (TVM aborts on a count above its pool) */
        const par_launch_t run = (par_launch_t)launch;
        if (run(tables_task, &j, 0) || run(segments_task, &j, 0)) err = fail(0, ERR_LAUNCH);
    } else {
        pool_run(&j, threads);
    }
    free(j.tables); free(j.TS); free(j.XS);
    return j.oom ? fail(0, ERR_MEMORY) : err;
}

/* The ABI-2 entry point: int8 (fp32 = 0) or fp32 (fp32 != 0) tables of float activations. */
int64_t lut_exec(const uint64_t* s, const int64_t* pos, int64_t ntables, int64_t nsegs, const uint8_t* W,
                 const float* P, const void* O, const float* X, int64_t M, float* Y, int fp32, int threads,
                 void* launch) {
    return lut_exec_tables(s, pos, ntables, nsegs, W, P, O, X, M, Y, fp32 ? TABLES_FP32 : TABLES_INT8, threads,
                           launch);
}
