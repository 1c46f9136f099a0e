"""LUT GEMV / small-batch GEMM on the CPU: the lut-cpu engine against dense and dequantizing baselines.

One run measures, for N = K = 4096 and SmolLM2-135M's linear shapes, M = 1, 4, 16, 2/3/4-bit
weights (rtn-intK, group 128, int8 tables) on 1 and 2 threads:

* lut: the fast C executor running the layer's instruction stream (docs/lut-isa.md);
* numpy: dequantize the packed codes (bitsmith.ir.quantized.dequantize) then matmul;
* torch: fp32 matmul on the dense weight (torch.nn.functional.linear);
* tvm-llvm: the tvm backend's quantized kernel for the same qlinear, where that backend builds.

Weights are "cold": the LUT executor rotates through copies of the layer totalling >= 128 MiB
(> the 32 MiB L3), so each call reads its weights from DRAM. Read bandwidth is measured in the
same run (torch.sum over 512 MiB of float32, per thread count). GB/s counts the bytes the
engine reads for the weights (weight words + SCALE parameters); "codes GB/s" counts the
packed codes alone (N*K*bits/8), as in shared/notes/cpu-lut-kernels.md.

The goal table (``--goal``, also printed first by a full run) is the issue's figure: M = 1,
N = K = 4096, 4-bit and 2-bit, 1 and 2 threads, for every engine build this CPU runs (AVX2,
AVX-512) and for int8 activations (``activation_bits=8``): fraction of the read bandwidth
measured right before each row in the same process (the machine is shared: bandwidth drifts),
and the ratio over torch fp32 dense (``torch.nn.functional.linear``) timed in the same row.
``--markdown FILE`` writes it with the machine line.

    python benchmarks/lut_gemv.py                 # everything (a few minutes)
    python benchmarks/lut_gemv.py --goal --markdown benchmarks/results/lut_gemv.md
    python benchmarks/lut_gemv.py --quick         # N = K = 4096 only, 4-bit
    python benchmarks/lut_gemv.py --shiftadd --markdown benchmarks/results/lut_gemv_shiftadd.md

``--shiftadd``: binary-coded (bcq_linear, ShiftAddLLM) layers on the same engine at M = 1,
N = K = 4096, 1 thread: shiftadd-w2/w3/w4 with power-of-two scales (int16 shift weights),
apot2 and fp16 scales (float plane weights) at w3, beside bitmod-w3 and rtn-int3 qlinears.
"""

from __future__ import annotations

import os

# Before torch loads libgomp: OpenMP's default spin-waiting at barriers makes torch's 2-thread
# baseline stall whenever other jobs keep the cores busy. (The engine no longer uses OpenMP: its
# own pool spins briefly, then sleeps.) An explicit OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import platform
import time
from typing import Callable

import numpy as np
import torch

from bitsmith.backends.lut import native
from bitsmith.backends.lut.codegen import LayerProgram, generate
from bitsmith.backends.lut.codegen_bcq import generate_bcq
from bitsmith.backends.lut.decompose import decompose
from bitsmith.ir import GraphBuilder, TensorType
from bitsmith.ir.code_packing import group_count, pack_codes
from bitsmith.ir.quantized import dequantize

SHAPES = {"4096x4096": (4096, 4096), "smollm2 q/o 576x576": (576, 576), "smollm2 k/v 192x576": (192, 576),
          "smollm2 gate/up 1536x576": (1536, 576), "smollm2 down 576x1536": (576, 1536)}
GROUP = 128


def timeit_cpu(fn: Callable[[], object], min_seconds: float, repeats: int) -> tuple[float, float]:
    """(wall, CPU time of this process) per call, each the min over ``repeats`` means of >= min_seconds
    (on a shared machine the CPU clock leaves out the time other processes take)."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds and n >= 2:
                break
        wall, cpu = min(wall, dt / n), min(cpu, (time.process_time() - c0) / n)
    return wall, cpu


def cold_copies(prog: LayerProgram, cold_mib: int) -> list[LayerProgram]:
    """Copies of a layer program totalling >= ``cold_mib`` MiB of weights, so that rotating through
    them reads each call's weights from DRAM. Each copy has its own stream, as each layer of a
    compiled model has: the executor caches a validated plan per stream array, and copies sharing
    one stream re-validated it on every call (~0.1 ms at N = K = 4096, charged to the engine until
    this was found)."""
    read = prog.weights.nbytes + prog.params.nbytes
    copies = max(1, min(4096, (cold_mib << 20) // read))
    return [LayerProgram(prog.stream.copy(), prog.weights.copy(), prog.params.copy(), prog.outliers,
                         prog.in_features) for _ in range(copies)]


def timeit(fn: Callable[[], object], min_seconds: float = 0.15, repeats: int = 3) -> float:
    """Min over ``repeats`` of the mean time of a call, each mean over >= min_seconds."""
    return timeit_cpu(fn, min_seconds, repeats)[0]


def read_bandwidth(threads: int, min_seconds: float = 0.3) -> float:
    torch.set_num_threads(threads)
    a = torch.ones(128 << 20)  # 512 MiB
    t = timeit(lambda: a.sum(), min_seconds)
    return a.numel() * 4 / t / 1e9


def quantized_layer(n: int, k: int, bits: int, rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    scheme = f"rtn-int{bits}"
    groups = group_count(k, GROUP)
    attrs = dict(scheme=scheme, group_size=GROUP, in_features=k, out_features=n, sparsity="", outliers=False,
                 bias=False)
    ops = [pack_codes(rng.integers(0, 1 << bits, (n, k)), bits),
           rng.uniform(0.001, 0.01, (n, groups)).astype(np.float16),
           rng.integers(0, 1 << bits, (n, groups)).astype(np.uint8)]
    return attrs, ops


def tvm_runner(attrs: dict, ops: list[np.ndarray], m: int) -> tuple[Callable[[np.ndarray], object] | None, str]:
    """A callable running the qlinear on target tvm-llvm, or (None, why not)."""
    try:
        from bitsmith.backends.base import backend_for_target
        backend = backend_for_target("tvm-llvm")
        b = GraphBuilder()
        x = b.param("x", TensorType((m, attrs["in_features"]), "float32"))
        names = ["codes", "scales", "zeros"]
        ins = [x] + [b.constant(f"layer.weight.{r}", a) for r, a in zip(names, ops)]
        module = b.module([b.op("qlinear", ins, attrs)])
        exe = backend.build(module, "tvm-llvm", backend.option_defaults("tvm-llvm"))
        return (lambda xv: exe.run("main", [xv])), "ok"
    except Exception as e:  # the tvm backend may not be built yet: report, don't fail
        return None, f"{type(e).__name__}: {str(e)[:60]}"


def goal_table(libraries: dict[str, native.NativeExecutor], cold_mib: int, table_group: int,
               rng: np.random.Generator, reps: int = 5) -> list[dict]:
    """The issue's figure: M = 1, N = K = 4096, per bits, threads, engine build and activation bits.
    Each row is ``reps`` repetitions of (read-bandwidth probe, LUT timing) back to back in this
    process; the fraction of read bandwidth is reported as median and best over them."""
    n = k = 4096
    rows = []
    x = rng.normal(size=(1, k)).astype(np.float32)
    xt = torch.from_numpy(x)
    for bits in (4, 2):
        attrs, ops = quantized_layer(n, k, bits, rng)
        prog = generate(decompose(attrs, ops), table_group)
        read = prog.weights.nbytes + prog.params.nbytes
        progs = cold_copies(prog, cold_mib)
        copies = len(progs)
        dense_w = torch.from_numpy(dequantize(attrs, ops))
        for threads in (1, 2):
            for isa, lut in libraries.items():
                for abits in (32, 8):
                    state = {"i": 0}

                    def run_lut() -> None:
                        state["i"] = (state["i"] + 1) % copies
                        lut.run(progs[state["i"]], x, True, threads, activation_bits=abits)

                    fracs, walls, cpus, bws = [], [], [], []
                    for _ in range(reps):
                        bw = read_bandwidth(threads, 0.15)
                        wall, cpu = timeit_cpu(run_lut, 0.1, 3)
                        bws.append(bw)
                        walls.append(wall)
                        cpus.append(cpu)
                        fracs.append(read / wall / 1e9 / bw)
                    torch.set_num_threads(threads)
                    t_torch = timeit(lambda: torch.nn.functional.linear(xt, dense_w), 0.2, 3)
                    t_lut = float(np.median(walls))
                    row = dict(bits=bits, threads=threads, isa=isa, abits=abits, lut=t_lut, lut_best=min(walls),
                               cpu=float(np.median(cpus)), bw=float(np.median(bws)), gbs=read / t_lut / 1e9,
                               torch=t_torch, read=read, frac=float(np.median(fracs)), frac_best=max(fracs))
                    rows.append(row)
                    print(f"4096x4096 {bits}-bit T{threads} {isa:<6} a{abits:<2} | lut {t_lut * 1e3:7.3f} ms "
                          f"(cpu {row['cpu'] * 1e3:6.3f}) {row['gbs']:5.1f} GB/s = {100 * row['frac']:3.0f}% "
                          f"(best {100 * row['frac_best']:3.0f}%) of {row['bw']:4.1f} GB/s read | torch fp32 "
                          f"{t_torch * 1e3:7.3f} ms, lut {t_torch / t_lut:5.1f}x faster", flush=True)
    return rows


def bcq_layer(n: int, k: int, bits: int, scale: str, rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """Random bcq_linear operands with scales shaped like a greedy fit's: plane i about 2**-i of plane 0."""
    from bitsmith.ir.bcq import pack_planes
    groups = group_count(k, GROUP)
    attrs = dict(bits=bits, group_size=GROUP, in_features=k, out_features=n, scale=scale, bias=False)
    signs = rng.choice(np.array([-1, 1], np.int8), (bits, n, k))
    e = rng.integers(-9, -5, (1, n, groups)) - np.arange(bits)[:, None, None] - rng.integers(0, 2, (bits, n, groups))
    if scale == "pow2":
        scales = e.astype(np.int8)
    elif scale == "apot2":
        scales = np.stack([e, e - rng.integers(1, 4, e.shape)], axis=-1).astype(np.int8)
    else:
        scales = (np.ldexp(1.0, e) * rng.uniform(1, 2, e.shape)).astype(np.float16)
    return attrs, [pack_planes(signs), scales]


def qlinear_layer(n: int, k: int, scheme: str, rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """Random valid qlinear operands of a symmetric-grid scheme (codes, scales, selectors)."""
    from bitsmith.ir.quant_grids import get_scheme
    from bitsmith.ir.quantized import operand_types
    sc = get_scheme(scheme)
    groups = group_count(k, GROUP)
    attrs = dict(scheme=scheme, group_size=GROUP, in_features=k, out_features=n, sparsity="", outliers=False,
                 bias=False)
    make = {"codes": lambda: pack_codes(rng.integers(0, len(sc.candidates[0].values), (n, k)), sc.bits),
            "scales": lambda: rng.uniform(0.001, 0.01, (n, groups)).astype(np.float16),
            "selectors": lambda: pack_codes(rng.integers(0, len(sc.candidates), (n, groups)), sc.selector_bits)}
    return attrs, [make[role]() for role, _ in operand_types(attrs)]


SHIFTADD_ROWS = (("shiftadd-w3", 3, "pow2"), ("shiftadd-w3-apot2", 3, "apot2"), ("shiftadd-w3-fp16", 3, "fp16"),
                 ("shiftadd-w2", 2, "pow2"), ("shiftadd-w4", 4, "pow2"), ("bitmod-w3", 3, None),
                 ("rtn-int3", 3, None))


def shiftadd_table(libraries: dict[str, native.NativeExecutor], cold_mib: int, table_group: int,
                   rng: np.random.Generator) -> list[dict]:
    """M = 1, N = K = 4096, 1 thread: binary-coded layers vs bitmod-w3 / rtn-int3 on the same engine."""
    n = k = 4096
    x = rng.normal(size=(1, k)).astype(np.float32)
    xt = torch.from_numpy(x)
    torch.set_num_threads(1)
    dense_w = torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32))
    rows = []
    for label, bits, scale in SHIFTADD_ROWS:
        if scale is not None:
            prog = generate_bcq(*bcq_layer(n, k, bits, scale, rng), table_group)
        elif label.startswith("rtn"):
            prog = generate(decompose(*quantized_layer(n, k, bits, rng)), table_group)
        else:
            prog = generate(decompose(*qlinear_layer(n, k, label, rng)), table_group)
        read = prog.weights.nbytes + prog.params.nbytes
        progs = cold_copies(prog, cold_mib)
        copies = len(progs)
        for isa, lut in libraries.items():
            state = {"i": 0}

            def run_lut() -> None:
                state["i"] = (state["i"] + 1) % copies
                lut.run(progs[state["i"]], x, True, 1)

            t_lut, cpu_lut = timeit_cpu(run_lut, 0.2, 5)  # CPU time (1 thread): robust to load
            t_torch = timeit(lambda: torch.nn.functional.linear(xt, dense_w), 0.2, 3)
            row = dict(label=label, isa=isa, lut=t_lut, cpu=cpu_lut, torch=t_torch, read=read,
                       bpw=8 * read / (n * k), gbs=read / t_lut / 1e9)
            rows.append(row)
            print(f"{label:<18} {isa:<6} | lut {t_lut * 1e3:7.3f} ms wall, {cpu_lut * 1e3:7.3f} ms CPU, "
                  f"{row['bpw']:.2f} bits/weight read, {row['gbs']:5.1f} GB/s | torch fp32 {t_torch * 1e3:7.3f} ms",
                  flush=True)
    return rows


def shiftadd_markdown(rows: list[dict], machine: str, table_group: int, load: tuple[str, str]) -> str:
    base = {r["isa"]: r["cpu"] for r in rows if r["label"] == "bitmod-w3"}
    lines = ["# Binary-coded (shiftadd) layers on the LUT engine, N = K = 4096, M = 1, 1 thread "
             "(benchmarks/lut_gemv.py --shiftadd)", "",
             f"Machine: {machine} ({cpu_detail()}). Load average before / after: {load[0]} / {load[1]} (shared "
             "machine: compare within one engine build's column; timings vary 10-30% and more).",
             f"Group 128, int8 tables (lut_table_group {table_group}); weights rotated through >= 128 MiB of copies "
             "(read from DRAM each call). Random signs and scales (plane i about 2^-i of plane 0). bits/weight read "
             "= (weight words + BCQMUL records + SCALE parameters) * 8 / (N K). x bitmod-w3 = bitmod-w3 / row "
             "CPU time on the same build (CPU ms: this thread's CPU time per call, min of 5 means; on a loaded "
             "machine wall time mostly measures the scheduler).", "",
             "| layer | engine build | LUT CPU ms | LUT wall ms | bits/weight read | GB/s (wall) | x bitmod-w3 (CPU) "
             "| torch fp32 wall ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['isa']} | {r['cpu'] * 1e3:.3f} | {r['lut'] * 1e3:.3f} | {r['bpw']:.2f} | "
                     f"{r['gbs']:.1f} | {base[r['isa']] / r['cpu']:.2f} | {r['torch'] * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


def cpu_detail() -> str:
    """cpuinfo's family/model (the model name may be just "AMD EPYC") and the vector extensions
    the engine builds care about."""
    from bitsmith.backends.native_loader import cpu_features
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = cpu_features()
    ext = [name for name, flag in (("AVX2", "avx2"), ("AVX-512F", "avx512f"), ("AVX-512BW", "avx512bw"),
                                   ("AVX-512VL", "avx512vl"), ("AVX-512 VNNI", "avx512_vnni")) if flag in flags]
    return f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}; " \
           f"{', '.join(ext) or 'no AVX2'}"


def goal_markdown(rows: list[dict], machine: str, table_group: int, load: str, load_after: str = "?") -> str:
    lines = ["# LUT GEMV at N = K = 4096, M = 1 (benchmarks/lut_gemv.py --goal)", "",
             f"Machine: {machine} ({cpu_detail()}). OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (torch's "
             f"baseline; the engine runs on its own thread pool). Load average before the run: {load}, after: "
             f"{load_after} (the machine is shared by other jobs: timings vary 10-30% and more between runs).",
             f"rtn-intK weights, group 128, int8 tables (lut_table_group {table_group}); weights rotated through "
             ">= 128 MiB of copies (each call reads them from DRAM). GB/s = engine bytes read (weight words + "
             "SCALE parameters) / time; each row repeats (read bandwidth = torch.sum over 512 MiB, then the LUT "
             "timing) back to back: % of read BW is the median and the best of those repetitions; LUT ms and "
             "CPU ms (this process's CPU time per call, which leaves out other processes' time) are medians; "
             "x torch = torch fp32 dense (F.linear on the dequantized weight) time / LUT time.", "",
             "| bits | threads | engine build | activations | LUT ms | CPU ms | GB/s | % of read BW (median / best) | "
             "read BW GB/s | torch fp32 ms | x torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        act = "int8 (activation_bits=8)" if r["abits"] == 8 else "fp32 (int8 tables)"
        lines.append(f"| {r['bits']} | {r['threads']} | {r['isa']} | {act} | {r['lut'] * 1e3:.3f} | "
                     f"{r['cpu'] * 1e3:.3f} | {r['gbs']:.1f} | {100 * r['frac']:.0f}% / {100 * r['frac_best']:.0f}% | "
                     f"{r['bw']:.1f} | {r['torch'] * 1e3:.3f} | {r['torch'] / r['lut']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = K = 4096, 4-bit only")
    ap.add_argument("--cold-mib", type=int, default=128, help="total size of the rotated weight copies (> L3)")
    ap.add_argument("--table-group", type=int, default=32, help="activations per int8 table scale (lut_table_group)")
    ap.add_argument("--library", help="a prebuilt lutexec.so (default: build native/lutexec.c with gcc now)")
    ap.add_argument("--goal", action="store_true", help="only the N = K = 4096 goal table (every engine build)")
    ap.add_argument("--markdown", help="write the goal table (with --shiftadd: the shiftadd table) to this file")
    ap.add_argument("--shiftadd", action="store_true", help="only the binary-coded (shiftadd) rows, 1 thread")
    args = ap.parse_args()
    shapes = {"4096x4096": SHAPES["4096x4096"]} if args.quick else SHAPES
    bit_list = (4,) if args.quick else (2, 3, 4)
    if not native.cpu_has_avx2():
        raise SystemExit("this benchmark needs an AVX2 CPU (the fast LUT executor)")
    if args.library:  # a library named on the command line is trusted by whoever named it
        from bitsmith.backends import native_loader
        library = open(args.library, "rb").read()
        native_loader.grant(native_loader.sha256(library), native.SPEC, native_loader.TRUSTED_CALLER)
    else:
        library = native.build_library()
    lut = native.load_library(library)
    libraries = {isa: native.load_library(native.build_library(isa=isa), isa)
                 for isa in native.ENGINE_ISAS if native.cpu_runs(isa)}
    if not args.library:
        lut = libraries[native.choose_isa("host")]
    from machine import machine_line
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine_line()} ({cpu_detail()}); load average {load}")
    if args.shiftadd:
        rows = shiftadd_table(libraries, args.cold_mib, args.table_group, np.random.default_rng(2))
        after = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"load average after: {after}")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(shiftadd_markdown(rows, machine_line(), args.table_group, (load, after)))
        return
    goal = goal_table(libraries, args.cold_mib, args.table_group, np.random.default_rng(1))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(goal_markdown(goal, machine_line(), args.table_group, load,
                                  " ".join(f"{v:.2f}" for v in os.getloadavg())))
    if args.goal:
        return
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, numpy {np.__version__}")
    bw = {t: read_bandwidth(t) for t in (1, 2)}
    print(f"int8 tables, lut_table_group {args.table_group}, group size {GROUP}, rtn-intK weights")
    print(f"measured read bandwidth (torch.sum over 512 MiB): 1 thread {bw[1]:.1f} GB/s, 2 threads {bw[2]:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    print(f"\n{'shape':<26}{'bits':>4}{'M':>4}{'T':>3} | {'lut ms':>8}{'GB/s':>7}{'%rdBW':>7}{'codesGB/s':>10} | "
          f"{'torch ms':>9}{'x':>6} | {'numpy ms':>9}{'x':>6} | {'tvm ms':>8}")
    for label, (n, k) in shapes.items():
        dense_w = None
        for bits in bit_list:
            attrs, ops = quantized_layer(n, k, bits, rng)
            prog = generate(decompose(attrs, ops), args.table_group)
            read = prog.weights.nbytes + prog.params.nbytes
            progs = cold_copies(prog, args.cold_mib)
            copies = len(progs)
            w = dequantize(attrs, ops)
            dense_w = torch.from_numpy(w)
            for m in (1, 4, 16):
                x = rng.normal(size=(m, k)).astype(np.float32)
                xt = torch.from_numpy(x)
                tvm_fn, tvm_note = tvm_runner(attrs, ops, m)
                t_np = timeit(lambda: x @ dequantize(attrs, ops).T, 0.1, 2)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    state = {"i": 0}

                    def run_lut() -> None:
                        state["i"] = (state["i"] + 1) % copies
                        lut.run(progs[state["i"]], x, True, threads)

                    t_lut = timeit(run_lut)
                    t_torch = timeit(lambda: torch.nn.functional.linear(xt, dense_w))
                    t_tvm = timeit(lambda: tvm_fn(x)) if tvm_fn is not None else None
                    gbs = read / t_lut / 1e9
                    row = dict(shape=label, bits=bits, m=m, threads=threads, lut=t_lut, gbs=gbs, frac=gbs / bw[threads],
                               codes=n * k * bits / 8 / t_lut / 1e9, torch=t_torch, numpy=t_np, tvm=t_tvm)
                    rows.append(row)
                    tvm_txt = f"{t_tvm * 1e3:8.3f}" if t_tvm is not None else "     n/a"
                    print(f"{label:<26}{bits:>4}{m:>4}{threads:>3} | {t_lut * 1e3:8.3f}{gbs:7.1f}{100 * row['frac']:6.0f}%"
                          f"{row['codes']:10.1f} | {t_torch * 1e3:9.3f}{t_torch / t_lut:6.1f} | {t_np * 1e3:9.2f}"
                          f"{t_np / t_lut:6.0f} | {tvm_txt}", flush=True)
                if tvm_fn is None and m == 1 and bits == bit_list[0] and label == next(iter(shapes)):
                    print(f"  (tvm-llvm quantized kernel: n/a, {tvm_note})")
    goal = {(r["threads"]): r for r in rows if r["shape"] == "4096x4096" and r["bits"] == 4 and r["m"] == 1}
    if goal:
        g1, g2 = goal[1], goal[2]
        print(f"\ngoals at M=1, 4-bit, N=K=4096: speedup over torch fp32 dense on 1 thread {g1['torch'] / g1['lut']:.2f}x "
              f"(goal >= 3x); fraction of measured read bandwidth on 2 threads {100 * g2['frac']:.0f}% (goal >= 60%)")
    print("numpy = dequantize (unpack codes, scale) + matmul each call, numpy's BLAS threads; "
          "torch/tvm weights are not rotated (4096x4096 fp32 = 64 MiB exceeds L3 anyway)")


if __name__ == "__main__":
    main()
