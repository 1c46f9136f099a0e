/* One native call per run of a tvm-llvm plan (docs/tvm-backend.md, "Native step driver").
 *
 * The Python executor (executor.py) walks a FunctionPlan step by step: ~450 kernel calls per
 * SmolLM2 decode token, each a Python -> tvm_ffi call that converts its numpy arguments to
 * DLPack. This driver walks the same steps in C over a table of DLTensors the caller set up
 * once per thread (data pointers, dtypes, and shape pointers into a shape table the caller
 * refreshes once per run), calling each kernel through tvm-ffi's C ABI (TVMFFIFunctionCall on
 * the kernel's Function handle, the same function object Python calls) and each extern step
 * (the LUT engine) through its own C entry point. It computes nothing itself but token-id
 * range checks, the LUT engine's input padding and its bias add (a float add per element, as
 * numpy's ``out += bias`` does), so results equal the Python executor's bit for bit.
 *
 * Program: int64 words, one record per step:
 *   KERNEL fn nargs slot...      call kernels[fn] on tensors[slot]...
 *   VIEW src dst                 tensors[dst].data = tensors[src].data (a reshape)
 *   CHECK slot bound             every id of tensors[slot] in [0, bound) or stop with ERR_IDS
 *   EXTERN layer has_bias x [bias] out   externs[layer] (the LUT engine's lut_exec)
 * Errors: (step index << 8) | code; 0 = success. No allocation happens here except a padded
 * copy of the LUT input when its width is not the engine's padded width.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>

#define DRIVER_ABI 1
enum { OP_KERNEL = 0, OP_VIEW = 1, OP_CHECK = 2, OP_EXTERN = 3 };
enum { ERR_KERNEL = 1, ERR_IDS = 2, ERR_OPCODE = 3, ERR_EXTERN = 4, ERR_MEMORY = 5, ERR_ARGS = 6 };
#define MAX_ARGS 64

typedef int (*ffi_call_t)(TVMFFIObjectHandle, TVMFFIAny*, int32_t, TVMFFIAny*);
typedef void (*ffi_move_error_t)(TVMFFIObjectHandle*);
typedef int (*ffi_decref_t)(TVMFFIObjectHandle);
typedef int64_t (*lut_exec_t)(const uint64_t*, const int64_t*, int64_t, int64_t, const uint8_t*, const float*,
                              const void*, const float*, int64_t, float*, int, int, void*);

/* An extern LUT layer: lut_exec's bound operands and the rules _BoundStream applies per call. */
typedef struct {
    lut_exec_t fn;
    const uint64_t* stream; const int64_t* pos; int64_t ntables, nsegs;
    const uint8_t* W; const float* P; const void* O;
    int64_t n, k, kpad, macs_per_row, auto_single_below; /* threads=0 and m*macs below: 1 thread */
    int64_t kind, threads;  /* kind: lut_exec_tables' table kind (0 int8, 1 fp32, 2 A8) */
    void* launcher;
} extern_layer_t;

typedef struct {
    ffi_call_t call; ffi_move_error_t move_error; ffi_decref_t decref;
} ffi_api_t;

int bs_driver_abi(void) { return DRIVER_ABI; }

static int64_t fail(int64_t step, int code) { return (step << 8) | code; }

static int64_t numel(const DLTensor* t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static int ids_ok(const DLTensor* t, int64_t bound) {
    const int64_t n = numel(t);
    if (t->dtype.code != kDLInt && t->dtype.code != kDLUInt) return 0;
    switch (t->dtype.bits) {
    case 64: { const int64_t* p = t->data; for (int64_t i = 0; i < n; i++) if (p[i] < 0 || p[i] >= bound) return 0; return 1; }
    case 32: { const int32_t* p = t->data; for (int64_t i = 0; i < n; i++) if (p[i] < 0 || p[i] >= bound) return 0; return 1; }
    default: return 0;
    }
}

static int is_f32(const DLTensor* t) { return t->dtype.code == kDLFloat && t->dtype.bits == 32 && t->dtype.lanes == 1; }

static int64_t run_extern(const extern_layer_t* L, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
    const int64_t m = x->ndim == 2 ? x->shape[0] : 0;
    if (x->ndim != 2 || x->shape[1] != L->k || y->ndim != 2 || y->shape[0] != m || y->shape[1] != L->n)
        return ERR_ARGS;
    /* the engine reads x and writes y as float32, the bias add reads n float32s */
    if (!is_f32(x) || !is_f32(y) || (bias && (!is_f32(bias) || bias->ndim != 1 || bias->shape[0] != L->n)))
        return ERR_ARGS;
    float* out = y->data;
    memset(out, 0, sizeof(float) * (size_t)(m * L->n));  /* rows no STORE writes are 0 (spec) */
    if (m == 0) return 0;
    const float* xp = x->data;
    float* padded = NULL;
    if (L->kpad != L->k) {
        padded = calloc((size_t)(m * L->kpad), sizeof(float));
        if (!padded) return ERR_MEMORY;
        for (int64_t r = 0; r < m; r++) memcpy(padded + r * L->kpad, xp + r * L->k, sizeof(float) * (size_t)L->k);
        xp = padded;
    }
    int threads = (int)L->threads;
    if (threads == 0 && m * L->macs_per_row < L->auto_single_below) threads = 1;
    int64_t err = L->fn(L->stream, L->pos, L->ntables, L->nsegs, L->W, L->P, L->O, xp, m, out, (int)L->kind,
                        threads, L->launcher);
    free(padded);
    if (err) return ERR_EXTERN;
    if (bias) {
        const float* b = bias->data;
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < L->n; j++) out[r * L->n + j] = out[r * L->n + j] + b[j];
    }
    return 0;
}

/* Runs the program; tensors[] as the caller set them. Returns 0 or (step << 8) | code; for a
 * kernel's refusal the tvm-ffi error is taken off the thread (the caller re-runs the plan in
 * Python to report it). */
int64_t bs_run(const int64_t* prog, int64_t nwords, DLTensor* tensors, int64_t nslots, void* const* kernels,
               int64_t nkernels, const extern_layer_t* externs, int64_t nexterns, const ffi_api_t* api) {
    TVMFFIAny args[MAX_ARGS];
    int64_t step = 0;
    for (int64_t i = 0; i < nwords; step++) {
        const int64_t op = prog[i];
        if (op == OP_KERNEL) {
            const int64_t fn = prog[i + 1], nargs = prog[i + 2];
            if (fn < 0 || fn >= nkernels || nargs < 0 || nargs > MAX_ARGS) return fail(step, ERR_ARGS);
            for (int64_t a = 0; a < nargs; a++) {
                const int64_t s = prog[i + 3 + a];
                if (s < 0 || s >= nslots) return fail(step, ERR_ARGS);
                args[a].type_index = kTVMFFIDLTensorPtr;
                args[a].zero_padding = 0;
                args[a].v_ptr = &tensors[s];
            }
            TVMFFIAny result;
            result.type_index = kTVMFFINone;
            result.zero_padding = 0;
            result.v_int64 = 0;
            if (api->call(kernels[fn], args, (int32_t)nargs, &result)) {
                TVMFFIObjectHandle e = NULL;
                api->move_error(&e);
                if (e) api->decref(e);
                return fail(step, ERR_KERNEL);
            }
            if (result.type_index >= kTVMFFIStaticObjectBegin && result.v_obj) api->decref(result.v_obj);
            i += 3 + nargs;
        } else if (op == OP_VIEW) {
            const int64_t src = prog[i + 1], dst = prog[i + 2];
            if (src < 0 || src >= nslots || dst < 0 || dst >= nslots) return fail(step, ERR_ARGS);
            tensors[dst].data = tensors[src].data;
            i += 3;
        } else if (op == OP_CHECK) {
            const int64_t s = prog[i + 1];
            if (s < 0 || s >= nslots) return fail(step, ERR_ARGS);
            if (!ids_ok(&tensors[s], prog[i + 2])) return fail(step, ERR_IDS);
            i += 3;
        } else if (op == OP_EXTERN) {
            const int64_t layer = prog[i + 1], has_bias = prog[i + 2];
            if (layer < 0 || layer >= nexterns) return fail(step, ERR_ARGS);
            const int64_t xs = prog[i + 3], bs = has_bias ? prog[i + 4] : -1, ys = prog[i + 4 + (has_bias ? 1 : 0)];
            if (xs < 0 || xs >= nslots || ys < 0 || ys >= nslots || (has_bias && (bs < 0 || bs >= nslots)))
                return fail(step, ERR_ARGS);
            const int64_t err = run_extern(&externs[layer], &tensors[xs], has_bias ? &tensors[bs] : NULL, &tensors[ys]);
            if (err) return fail(step, (int)err);
            i += 5 + (has_bias ? 1 : 0);
        } else {
            return fail(step, ERR_OPCODE);
        }
    }
    return 0;
}
