"""The stages of a first contact with a GPU: `bash bench/gpu_check.sh OUTDIR first|tune` runs them.

One subcommand per stage; each appends its rows to ``OUTDIR/bench.json`` as it goes (read,
extend, rewrite after every row), so a stage killed at its time limit keeps what it measured,
and the shell script's next stage still runs:

    env           GPU, clocks, versions; the copy and bf16 GEMM ceilings        -> env.txt
    correctness   every kernel family, bf16/fp16/fp32, awkward shapes and one
                  large, against float64 by relative error, outputs poisoned,
                  one pinned config per kernel (no autotuning), compiled ahead
                  by a worker process per core (--warm-seconds)                 -> correctness.log
    headline      frozen nn.Linear, PEFT, eager, torch.compile, unsloth-style,
                  triton (cuda in its own call, once the extension is built):
                  8192 tokens, 4096→4096 and 4096→14336, r=16, bf16, ratios to
                  the frozen layer in the same process beside the cost model    -> headline.md
    extra         the 512/2048-token rows and the e2e training step
    ncu-target    the forward and dx kernels at the headline shape, for ncu (tune)
    ncu-report    ncu's CSV against the cost model's bytes and FLOPs             -> ncu.txt
    sanitize      a few CUDA-backend calls, for compute-sanitizer (tune)
    autotune      the autotuner's choice per headline shape (tune)              -> autotune.txt
    warm          one compile-ahead worker of correctness (its cases, results discarded)
    train-step    bench/train_step.py with the arguments after ``--``

A stage fails (status 1) on any Triton warning and on any case that fell back from the TMA kernel
to the pointer kernel in its process, each printed as ``FAILED: <stage>: ...`` (the shell script
copies these lines into summary.txt) and kept in bench.json's ``stages``.

``LORA_KERNELS_DRY_RUN=1`` runs every stage on the CPU: Triton's interpreter, tiny shapes,
the same files. Its numbers mean nothing; it proves the script before a GPU call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional

DRY_RUN = os.environ.get("LORA_KERNELS_DRY_RUN", "0") not in ("", "0")
if DRY_RUN:  # before Triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")
# NOTE: cuBLAS refuses to run in deterministic mode without a fixed workspace; the poisoning
# below switches that mode on around each call under test (it fills torch.empty with NaN).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# --------------------------------------------------------------------------- #
# What each stage runs, on a GPU and in the dry run
# --------------------------------------------------------------------------- #

# (tokens M, in K, out N, rank r): awkward on purpose (M = 1, K = 7, nothing a multiple of the
# tiles), then one large shape (run in bf16 only: the headline dtype).
AWKWARD = [(1, 7, 9, 1), (65, 136, 200, 16), (1000, 4100, 1030, 64)]
LARGE = (4096, 4096, 4096, 16)
DRY_AWKWARD = [(1, 7, 9, 1), (33, 40, 70, 16)]
DRY_LARGE = (64, 64, 96, 8)

HEADLINE_TOKENS = 8192
HEADLINE_LAYERS = [(4096, 4096), (4096, 14336)]
HEADLINE_RANK = 16
HEADLINE_DROPOUT = 0.1
DRY_TOKENS = 64
DRY_LAYERS = [(64, 64), (64, 224)]  # the same 1 : 3.5 aspect as 4096 → 14336
EXTRA_TOKENS = (512, 2048)

# The columns of the headline table: (mode, dropout).
COLUMNS = [("fwd", 0.0), ("fwd+bwd", 0.0), ("fwd+bwd", HEADLINE_DROPOUT)]
# Ours first: if the stage is cut off, the rows that matter most are in.
HEADLINE_PROVIDERS = ("base", "triton", "unsloth", "peft", "eager", "compile")
SLOW_LAST = ("compile",)

# Relative error against float64 (the test suite's bounds).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

FAMILIES = ("forward fused", "forward two_pass", "backward fused", "backward g_pass", "backward no-dx",
            "dropout", "merge/unmerge", "multi-adapter", "4-bit fused", "4-bit dequant")
# The families the cuda backend has (its forward and backward plans are chosen in C++).
CUDA_FAMILIES = ("forward", "backward", "backward no-dx", "dropout", "merge/unmerge")


def device() -> torch.device:
    return torch.device("cpu" if DRY_RUN or not torch.cuda.is_available() else "cuda")


def sync() -> None:
    if torch.cuda.is_available() and not DRY_RUN:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- #
# bench.json: every stage's rows, rewritten after each one
# --------------------------------------------------------------------------- #


class Results:
    """``OUTDIR/bench.json``: ``{"stages": {name: {...}}, "rows": [...]}``, rewritten after every change."""

    def __init__(self, out: Path) -> None:
        self.path = out / "bench.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}, "rows": []}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)  # a reader (or a kill) never sees half a file

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def stage(self, name: str, **info) -> None:
        self.data["stages"].setdefault(name, {}).update(info)
        self.save()

    def rows(self, stage: str) -> list[dict]:
        return [r for r in self.data["rows"] if r.get("stage") == stage]


class _Flushing(list):
    """A list that hands each appended row to ``sink`` at once (bench/run.py appends its rows)."""

    def __init__(self, sink: Callable[[dict], None]) -> None:
        super().__init__()
        self.sink = sink

    def append(self, row: dict) -> None:
        super().append(row)
        self.sink(row)


def _log(path: Path, line: str) -> None:
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


# --------------------------------------------------------------------------- #
# Stage 1: environment and ceilings
# --------------------------------------------------------------------------- #


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    from bench import timing

    dev = device()
    if dev.type == "cuda":
        return timing.bench_gpu(fn, 25, 100)["ms"]
    return timing.bench_cpu(fn, 2, 20, min_reps=reps)["ms"]


def ceilings() -> dict:
    """One large device-to-device copy (bytes read + written) and one large bf16 GEMM, on random data."""
    dev = device()
    n_copy, n_gemm = (2**28, 8192) if dev.type == "cuda" else (2**20, 256)
    src = torch.randn(n_copy // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 5)
    copy_tbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    a = torch.randn(n_gemm, n_gemm, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n_gemm, n_gemm, device=dev, dtype=torch.bfloat16)
    ms_g = _median_ms(lambda: a @ b, 5)
    gemm_tflops = 2 * n_gemm**3 / (ms_g * 1e-3) / 1e12
    return {"copy_TBps": round(copy_tbs, 3), "copy_bytes": 2 * src.numel() * src.element_size(),
            "bf16_gemm_TFLOPs": round(gemm_tflops, 1), "gemm_n": n_gemm}


def stage_env(out: Path, res: Results) -> int:
    from bench import env as envmod
    from lora_kernels import cost_model

    dev = device()
    env = envmod.collect(dev)
    env["dry_run"] = DRY_RUN
    env["ceilings"] = ceilings()
    if dev.type == "cuda":
        env["clocks"] = _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu")
        env["cost_model_device"] = cost_model.device_spec(dev).name
    res.data["env"] = env
    res.stage("env", done=True)
    lines = [f"{k}: {v}" for k, v in env.items()]
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _nvidia_smi(fields: str) -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


# --------------------------------------------------------------------------- #
# Stage 2: correctness
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def poisoned():
    """Every ``torch.empty`` inside fills its memory with NaN (integers with their largest value):
    an output element a kernel never writes shows up as an infinite error."""
    import torch.utils.deterministic as det

    before, fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    det.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        # NOTE: only the notice that deterministic mode prints for ops without a deterministic
        # kernel: any other warning (a Triton one, a TMA fallback) must reach the stage's check.
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)
            det.fill_uninitialized_memory = fill


def relative_error(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if out is None or out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()


@contextlib.contextmanager
def triton_plans(forward: Optional[str] = None, backward: Optional[str] = None):
    """Force the Triton forward/backward plan (None: the cost model chooses)."""
    from lora_kernels import triton_ops

    saved = triton_ops.FORWARD_PLAN, triton_ops.BACKWARD_PLAN
    triton_ops.FORWARD_PLAN, triton_ops.BACKWARD_PLAN = forward, backward
    try:
        yield
    finally:
        triton_ops.FORWARD_PLAN, triton_ops.BACKWARD_PLAN = saved


def _layer(M, K, N, r, dtype, dev, bias: bool):
    """Random data (never zeros; B is not zero, so the LoRA path really contributes)."""
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
    b = torch.randn(N, device=dev, dtype=dtype) if bias else None
    a = (torch.randn(r, K, device=dev) / K**0.5).to(dtype)
    bb = torch.randn(N, r, device=dev, dtype=dtype)
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    return x, w, b, a, bb, dy


def _d64(t):
    return None if t is None else t.detach().double()


def check_single(backend: str, family: str, shape, dtype) -> dict[str, float]:
    """Relative errors of one call of ``family`` on ``backend`` against float64."""
    import lora_kernels as lk
    from lora_kernels import reference

    M, K, N, r = shape
    dev = device()
    x, w, b, a, bb, dy = _layer(M, K, N, r, dtype, dev, bias=M % 2 == 1)
    s = 0.75
    if family == "merge/unmerge":
        want = _d64(w) + s * (_d64(bb) @ _d64(a))
        w_merged = w.clone()
        with poisoned():
            lk.merge_lora_(w_merged, a, bb, s, backend=backend)
        sync()
        err = {"merged": relative_error(w_merged, want)}
        with poisoned():
            lk.unmerge_lora_(w_merged, a, bb, s, backend=backend)
        sync()
        err["unmerged"] = relative_error(w_merged, w)
        return err
    p = 0.1 if family == "dropout" else 0.0
    seed = 1234
    train = family.startswith("backward") or family == "dropout"
    need_dx = family != "backward no-dx"
    forward_plan = {"forward fused": "fused", "forward two_pass": "two_pass"}.get(family)
    backward_plan = {"backward fused": "fused", "backward g_pass": "g_pass"}.get(family)
    x64, a64, b64 = (_d64(t).requires_grad_(train) for t in (x, a, bb))
    y64 = reference.lora_linear_reference(x64, _d64(w), _d64(b), a64, b64, s, p, seed)
    if train:
        y64.backward(_d64(dy))
    err: dict[str, float] = {}
    # NOTE: twice: the first call compiles and plans, the second launches from the cached plan
    # (Triton: straight to the compiled kernel's launcher); the worse error of the two counts.
    for _ in range(2):
        xg, ag, bg = x.clone().requires_grad_(train and need_dx), a.clone().requires_grad_(train), \
            bb.clone().requires_grad_(train)
        plans = triton_plans(forward_plan, backward_plan) if backend == "triton" else contextlib.nullcontext()
        with plans, poisoned():
            y = lk.lora_linear(xg, w, b, ag, bg, s, dropout_p=p, backend=backend, seed=seed)
            if train:
                y.backward(dy)
        sync()
        now = {"y": relative_error(y, y64)}
        if train:
            now["dA"], now["dB"] = relative_error(ag.grad, a64.grad), relative_error(bg.grad, b64.grad)
            if need_dx:
                now["dx"] = relative_error(xg.grad, x64.grad)
        err = {k: max(v, err.get(k, 0.0)) for k, v in now.items()}
    return err


def check_multi(backend: str, shape, dtype) -> dict[str, float]:
    """Three adapters of ranks r, r//2+1 and 1 (zero-padded to r), some rows on none (-1)."""
    import lora_kernels as lk
    from lora_kernels.multi_lora.reference import multi_lora_reference

    M, K, N, r = shape
    dev = device()
    x, w, b, _, _, dy = _layer(M, K, N, r, dtype, dev, bias=True)
    ranks = [r, r // 2 + 1, 1]
    a_list = [(torch.randn(q, K, device=dev) / K**0.5).to(dtype) for q in ranks]
    b_list = [torch.randn(N, q, device=dev, dtype=dtype) for q in ranks]
    a_pad = torch.zeros(3, r, K, device=dev, dtype=dtype)
    b_pad = torch.zeros(3, N, r, device=dev, dtype=dtype)
    for i, (ai, bi) in enumerate(zip(a_list, b_list)):
        a_pad[i, : ai.shape[0]], b_pad[i, :, : bi.shape[1]] = ai, bi
    scaling = [0.5, 2.0, 1.0]
    ids = torch.randint(-1, 3, (M,), device=dev)
    xg, ag, bg = x.clone().requires_grad_(), a_pad.clone().requires_grad_(), b_pad.clone().requires_grad_()
    with poisoned():
        y = lk.multi_lora_linear(xg, w, b, ag, bg, scaling, ids, backend=backend)
        y.backward(dy)
    sync()
    x64 = _d64(x).requires_grad_()
    a64 = [_d64(t).requires_grad_() for t in a_list]
    b64 = [_d64(t).requires_grad_() for t in b_list]
    y64 = multi_lora_reference(x64, _d64(w), _d64(b), a64, b64, scaling, ids)
    y64.backward(_d64(dy))
    da = torch.zeros(3, r, K, dtype=torch.float64, device=dev)
    db = torch.zeros(3, N, r, dtype=torch.float64, device=dev)
    for i, (ai, bi) in enumerate(zip(a64, b64)):
        da[i, : ai.shape[0]], db[i, :, : bi.shape[1]] = ai.grad, bi.grad
    return {"y": relative_error(y, y64), "dx": relative_error(xg.grad, x64.grad),
            "dA": relative_error(ag.grad, da), "dB": relative_error(bg.grad, db)}


def _random_quant_weight(N: int, K: int, dtype, dev, nested: bool):
    """A 4-bit weight in bitsandbytes' storage (lora_kernels.nf4.reference) with random codes and scales:
    any bytes are a valid weight, so the kernels' dequantisation is checked on all of them."""
    from lora_kernels.nf4.reference import QuantWeight

    blocks = N * K // 64
    code = torch.sort(torch.randn(16, device=dev)).values
    packed = torch.randint(0, 256, (N * K // 2,), device=dev, dtype=torch.uint8)
    empty = torch.empty(0, device=dev)
    if not nested:
        absmax = torch.rand(blocks, device=dev) / K**0.5
        return QuantWeight(packed, absmax, code, empty, empty, empty, 64, 0, (N, K), dtype)
    absmax = torch.randint(0, 256, (blocks,), device=dev, dtype=torch.uint8)
    code2 = torch.sort(torch.rand(256, device=dev)).values
    absmax2 = torch.rand(-(-blocks // 256), device=dev) / K**0.5
    return QuantWeight(packed, absmax, code, absmax2, code2, torch.full((1,), 0.01, device=dev), 64, 256, (N, K), dtype)


def check_4bit(backend: str, variant: str, shape, dtype) -> dict[str, float]:
    """The 4-bit base (lora_kernels.nf4) in one of its variants, against float64 on its dequantised W0;
    K is rounded up to the 64-element block."""
    from lora_kernels.nf4 import qlora_linear
    from lora_kernels.nf4 import triton_ops as q4_ops
    from lora_kernels.nf4.reference import dequantize_torch
    from lora_kernels import reference

    M, K, N, r = shape
    K = -(-K // 64) * 64
    dev = device()
    x, _, b, a, bb, dy = _layer(M, K, N, r, dtype, dev, bias=M % 2 == 1)
    q = _random_quant_weight(N, K, dtype, dev, nested=M % 2 == 0)
    xg, ag, bg = x.clone().requires_grad_(), a.clone().requires_grad_(), bb.clone().requires_grad_()
    saved = q4_ops.QLORA_VARIANT
    q4_ops.QLORA_VARIANT = variant
    try:
        with poisoned():
            y = qlora_linear(xg, q, b, ag, bg, 0.75, backend=backend)
            y.backward(dy)
    finally:
        q4_ops.QLORA_VARIANT = saved
    sync()
    x64, a64, b64 = (_d64(t).requires_grad_() for t in (x, a, bb))
    y64 = reference.lora_linear_reference(x64, _d64(dequantize_torch(q)), _d64(b), a64, b64, 0.75)
    y64.backward(_d64(dy))
    return {"y": relative_error(y, y64), "dx": relative_error(xg.grad, x64.grad),
            "dA": relative_error(ag.grad, a64.grad), "dB": relative_error(bg.grad, b64.grad)}


def correctness_cases(backend: str):
    """(dtype name, family, shape) in the order that matters: bf16 first, every family at each
    dtype before the next dtype, the large shape once in bf16."""
    awkward, large = (DRY_AWKWARD, DRY_LARGE) if DRY_RUN else (AWKWARD, LARGE)
    families = CUDA_FAMILIES if backend == "cuda" else FAMILIES
    for dname in ("bf16", "fp16", "fp32"):
        for family in families:
            for shape in awkward + ([large] if dname == "bf16" else []):
                yield dname, family, shape


def run_case(backend: str, dname: str, family: str, shape) -> dict[str, float]:
    """One correctness case's relative errors, on data seeded by the case (fresh, reproducible)."""
    dtype = DTYPES[dname]
    torch.manual_seed(zlib.crc32(repr((family, shape, dname)).encode()))
    if family == "multi-adapter":
        return check_multi(backend, shape, dtype)
    if family.startswith("4-bit"):
        return check_4bit(backend, family.split()[1], shape, dtype)
    return check_single(backend, family, shape, dtype)


def _pin_one_config(backend: str) -> None:
    if backend == "triton":
        from lora_kernels import triton_ops

        triton_ops.AUTOTUNE = False  # one pinned config per kernel: checks results, compiles a fraction


def run_bounded(argvs: list[list[str]], seconds: float) -> list[tuple[Optional[int], str]]:
    """Run the commands side by side, each in a session of its own; after ``seconds`` whatever still
    runs is killed with its children. (exit status, or None where killed; output) per command."""
    import signal
    import subprocess
    import tempfile

    procs = []
    for argv in argvs:
        sink = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True), sink))
    deadline = time.monotonic() + seconds
    done: list[tuple[Optional[int], str]] = []
    for proc, sink in procs:
        try:
            rc: Optional[int] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        sink.seek(0)
        done.append((rc, sink.read()))
        sink.close()
    return done


def compile_ahead(backend: str, out: Path, log: Path, workers: int, seconds: float) -> None:
    """Fill Triton's on-disk cache for the stage's cases before the checks run: ``workers``
    processes each run every ``workers``-th case (so all of them start with bf16, the stage's
    order) and are cut off after ``seconds``; the checks then load each kernel instead of
    compiling it (a case left uncompiled compiles in the checks, as without this)."""
    n = len(list(correctness_cases(backend)))
    workers = min(workers, n)
    if DRY_RUN or backend != "triton" or workers < 2:
        why = ("dry run: the interpreter compiles nothing" if DRY_RUN else
               f"the {backend} backend compiles no Triton kernel" if backend != "triton" else f"{workers} worker(s)")
        _log(log, f"[{backend}] compile-ahead skipped: {why}")
        return
    t0 = time.perf_counter()
    argvs = [[sys.executable, str(Path(__file__).resolve()), "warm", "--backend", backend, "--out", str(out),
              "--cases", ",".join(str(i) for i in range(w, n, workers))] for w in range(workers)]
    results = run_bounded(argvs, seconds)
    ran = sum(line.startswith("warm: case ") for _, text in results for line in text.splitlines())
    cut = sum(rc is None for rc, _ in results)
    crashed = [text.strip().splitlines()[-1][:200] for rc, text in results if rc not in (None, 0) and text.strip()]
    _log(log, f"[{backend}] compile-ahead: {workers} processes ran {ran} of {n} cases in "
              f"{time.perf_counter() - t0:.1f} s" + (f"; {cut} cut off at {seconds:g} s" if cut else "")
              + (f"; {len(crashed)} ended with an error, the last: {crashed[-1]}" if crashed else ""))


def stage_warm(backend: str, indices: list[int]) -> int:
    """A compile-ahead worker: run the correctness cases ``indices`` and discard their results (the
    checks run them again); one line per case, so the stage counts what ran before a cut-off."""
    torch.set_num_threads(1)
    _pin_one_config(backend)
    cases = list(correctness_cases(backend))
    for i in indices:
        t0 = time.perf_counter()
        try:
            run_case(backend, *cases[i])
            note = ""
        except Exception as exc:  # noqa: BLE001 - the check reports it
            note = f" ({type(exc).__name__})"
        sync()
        print(f"warm: case {i} {cases[i]} {time.perf_counter() - t0:.1f} s{note}", flush=True)
    return 0


def stage_correctness(out: Path, res: Results, backend: str, warm_workers: int = 0, warm_seconds: float = 0.0) -> int:
    from lora_kernels import backends

    log = out / "correctness.log"
    dev = device()
    why = backends.unavailable_reason(backend, dev)
    if why:
        _log(log, f"[{backend}] skipped: {why}")
        res.add({"stage": "correctness", "backend": backend, "status": "skipped", "reason": why})
        return 0
    _pin_one_config(backend)
    if warm_seconds > 0:
        compile_ahead(backend, out, log, warm_workers, warm_seconds)
    _log(log, f"[{backend}] {'family':<17} {'dtype':<5} {'shape M,K,N,r':<20} {'max rel err':>11}  "
              f"{'bound':>7}  {'s':>5}  errors")
    failed = 0
    for dname, family, shape in correctness_cases(backend):
        dtype = DTYPES[dname]
        t0 = time.perf_counter()
        try:
            errs = run_case(backend, dname, family, shape)
            worst = max(errs.values())
            status = "ok" if worst <= TOLERANCE[dtype] else "WRONG"
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        except Exception as exc:  # noqa: BLE001 - one failing family must not hide the others
            errs, worst, status = {}, math.inf, "ERROR"
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        secs = time.perf_counter() - t0
        failed += status != "ok"
        _log(log, f"[{backend}] {family:<17} {dname:<5} {','.join(map(str, shape)):<20} {worst:>11.2e}  "
                  f"{TOLERANCE[dtype]:>7.0e}  {secs:>5.1f}  {status} {detail}")
        res.add({"stage": "correctness", "backend": backend, "family": family, "dtype": dname,
                 "shape": list(shape), "errors": errs, "max_rel_err": worst, "bound": TOLERANCE[dtype],
                 "status": status.lower(), "seconds": round(secs, 2), "detail": detail})
    _log(log, f"[{backend}] {failed} failed")
    return 1 if failed else 0


# --------------------------------------------------------------------------- #
# Stage 3 (and 5): the headline table, through bench/run.py's measurement of one case
# --------------------------------------------------------------------------- #


def _bench_config(providers: list[str]) -> dict:
    gpu = device().type == "cuda"
    return {
        "device": str(device()), "dtype": "bf16", "providers": providers,
        "warmup_ms": 25.0 if gpu else 2.0, "rep_ms": 100.0 if gpu else 10.0,
        # NOTE: in the dry run the triton row runs under the interpreter (its time means nothing)
        # so that its code path is exercised.
        "allow_interpreter": DRY_RUN,
    }


def measure(res: Results, stage: str, providers: list[str], layers, tokens: list[int], columns) -> list[dict]:
    """bench/run.py's measurement (correctness check vs fp32, then do_bench with rotated inputs)
    for each layer × tokens × column; every row lands in bench.json as soon as it is measured."""
    from bench import run as runmod
    from bench import shapes

    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    config = _bench_config(providers)

    def sink(row: dict) -> None:
        row["stage"] = stage
        res.add(row)  # the same dict: the ratios added below land in bench.json too

    rows = _Flushing(sink)
    progress = runmod.Progress(0, enabled=False)
    # NOTE: torch.compile's compilation takes longest: it runs after every other provider has
    # measured every case, so a stage cut off at its limit loses only compile's rows.
    passes = [[p for p in providers if p not in SLOW_LAST], [p for p in providers if p in SLOW_LAST]]
    for names in (names for names in passes if names):
        for k, n in layers:
            layer = shapes.Layer(f"{k}x{n}", k, n)
            for m in tokens:
                for p in sorted({p for _, p in columns}):
                    modes = [mode for mode, q in columns if q == p]
                    case = shapes.Case(layer, m, HEADLINE_RANK, p)
                    runmod.run_activation_case(case, {**config, "providers": names, "modes": modes}, dev,
                                               torch.bfloat16, progress, rows)
    # Ratios (to this process's frozen layer) and predictions need the whole set.
    done = list(rows)
    runmod.add_ratios(done)
    res.stage(stage, cost_model_device=runmod.add_predictions(done, dev, torch.bfloat16))
    return done


def stage_headline(out: Path, res: Results, providers: list[str], stage: str = "headline") -> int:
    # NOTE: the dry run measures one layer: the second runs the same code on other numbers, and
    # the interpreter times each triton cell at least ten calls (bench/timing.py's repetitions).
    layers, tokens = (DRY_LAYERS[:1], [DRY_TOKENS]) if DRY_RUN else (HEADLINE_LAYERS, [HEADLINE_TOKENS])
    done = measure(res, stage, providers, layers, tokens, COLUMNS)
    write_headline(out, res)
    bad = [r for r in done if r["status"] in ("error", "wrong")]
    for r in bad:
        print(f"{r['provider']} {r['case']} {r['mode']}: {r['status']}: {r['reason']}", file=sys.stderr)
    return 1 if bad else 0


def stage_extra(out: Path, res: Results) -> int:
    """The 512/2048-token rows (4096→4096, fwd+bwd) for base, triton, cuda, unsloth and PEFT."""
    layers, tokens = ([DRY_LAYERS[0]], [16]) if DRY_RUN else ([HEADLINE_LAYERS[0]], list(EXTRA_TOKENS))
    measure(res, "extra", ["base", "triton", "cuda", "unsloth", "peft"], layers, tokens, [("fwd+bwd", 0.0)])
    write_headline(out, res)
    return 0


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    if r["status"] not in ("ok", "wrong"):
        return r["status"]
    text = f"{r['ratio']:.2f}× ({r['ms']:.3f} ms)" if "ratio" in r else f"{r['ms']:.3f} ms"
    if r.get("predicted_ratio") is not None:
        text += f" · model {r['predicted_ratio']:.2f}×"
    return text + (" **WRONG**" if r["status"] == "wrong" else "")


def render_headline(res: Results) -> str:
    """headline.md: one table per layer shape, a row per provider, ratios to the frozen layer."""
    env = res.data.get("env", {})
    rows = [r for r in res.data["rows"] if r.get("stage") in ("headline", "headline-cuda", "extra")]
    for r in rows:  # the cuda call's own frozen layer: its row is the cuda ratios' denominator
        r["label"] = "base (cuda's process)" if r["stage"] == "headline-cuda" and r["provider"] == "base" \
            else r["provider"]
    out = ["# headline", ""]
    out.append(f"{env.get('gpu') or env.get('device', '?')} · torch {env.get('torch')} · Triton {env.get('triton')} · "
               f"commit {str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''} · "
               f"{env.get('date')}" + (" · **DRY RUN on the CPU: numbers mean nothing**" if DRY_RUN else ""))
    ceil = env.get("ceilings")
    if ceil:
        out.append(f"ceilings: copy {ceil['copy_TBps']} TB/s, bf16 GEMM {ceil['bf16_gemm_TFLOPs']} TFLOP/s")
    out += ["", "Each cell: time / the frozen layer's time in the same process and mode (ms), and the cost "
            "model's prediction. bf16, r = 16. The `cuda` rows come from their own process (after the "
            "extension's build), with their own frozen-layer time.", ""]
    shapes_seen = list(dict.fromkeys((r["in"], r["out"], r["tokens"]) for r in rows))
    for k, n, m in shapes_seen:
        cells = {(r["label"], r["mode"], r["dropout"]): r for r in rows
                 if (r["in"], r["out"], r["tokens"]) == (k, n, m)}
        cols = [c for c in COLUMNS if any((p, *c) in cells for p, _, _ in cells)]
        out.append(f"## {k}→{n}, {m} tokens")
        out.append("")
        out.append("| provider | " + " | ".join(f"{mode}{f' p={p:g}' if p else ''}" for mode, p in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for prov in dict.fromkeys(p for p, _, _ in cells):
            out.append(f"| {prov} | " + " | ".join(_cell(cells.get((prov, *c))) for c in cols) + " |")
        notes = [f"- {p} {mode}{f' p={q:g}' if q else ''}: {r['status']}: {r['reason']}"
                 for (p, mode, q), r in cells.items() if r["status"] not in ("ok",) and r.get("reason")]
        out += [""] + notes + ([""] if notes else [])
    return "\n".join(out) + "\n"


def write_headline(out: Path, res: Results) -> None:
    text = render_headline(res)
    (out / "headline.md").write_text(text)
    print(text)


# --------------------------------------------------------------------------- #
# tune: ncu, compute-sanitizer, the autotuner's choices
# --------------------------------------------------------------------------- #


def _headline_inputs(k: int, n: int, m: int, p: float = 0.0):
    import lora_kernels as lk
    from torch import nn

    dev = device()
    base = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    layer = lk.LoRALinear.from_linear(base, r=HEADLINE_RANK, alpha=16.0, dropout=p, backend="triton")
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # not zero: the LoRA path computes
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    return layer, x


def stage_ncu_target(out: Path, res: Results) -> int:
    """Forward+backward at the first headline shape: three calls to compile and autotune, then one
    inside the NVTX range "profile", the only one ncu profiles (``--nvtx --nvtx-include profile/``)."""
    (k, n), m = (DRY_LAYERS[0], DRY_TOKENS) if DRY_RUN else (HEADLINE_LAYERS[0], HEADLINE_TOKENS)
    layer, x = _headline_inputs(k, n, m)
    dy = torch.randn(m, n, device=x.device, dtype=x.dtype)
    for _ in range(3):
        layer(x).backward(dy)
    sync()
    with _nvtx_range("profile"):
        layer(x).backward(dy)
        sync()
    print(f"ran 3 + 1 (profiled) forward+backward calls at M={m} K={k} N={n} r={HEADLINE_RANK}")
    return 0


@contextlib.contextmanager
def _nvtx_range(name: str):
    if device().type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# What ncu reads (names as ncu --metrics takes them) and what the report derives from them.
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed")
NCU_UNITS = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0,
             "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
NCU_KERNELS = ("_lora_forward_kernel", "_lora_backward_kernel", "_reduce_runs_kernel", "_lora_shrink_kernel",
               "_lora_g_kernel")


def _ncu_value(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return math.nan


def stage_ncu_report(out: Path, res: Results, csv_path: Path) -> int:
    """ncu's per-kernel duration and DRAM bytes against the cost model's launch of the same name."""
    import csv

    from lora_kernels import cost_model

    (k, n), m = HEADLINE_LAYERS[0], HEADLINE_TOKENS
    lines = []
    if not csv_path.exists() or not csv_path.read_text().strip():
        lines.append(f"no ncu output at {csv_path.name}: ncu did not run or profiled nothing")
    else:
        kernels: dict[str, dict[str, float]] = {}
        text = csv_path.read_text()
        start = text.find('"ID"')
        for row in csv.DictReader(text[start:].splitlines()) if start >= 0 else []:
            name = row.get("Kernel Name", "")
            unit = row.get("Metric Unit", "")
            value = _ncu_value(row.get("Metric Value", ""))
            value *= NCU_UNITS.get(unit, 1.0)  # to seconds and bytes
            kernels.setdefault(name, {})[row.get("Metric Name", "")] = value  # the last call of each
        spec = cost_model.device_spec(device())
        pred = cost_model.predict(m, k, n, HEADLINE_RANK, torch.bfloat16, 0.0, "fwd+bwd", "auto", spec)
        lines.append(f"M={m} K={k} N={n} r={HEADLINE_RANK} bf16 p=0; plan {pred.plan}; model device {spec.name}")
        lines.append(f"{'kernel':<24} {'µs':>8} {'model µs':>9} {'TFLOP/s':>8} {'GB moved':>9} {'model GB':>9} "
                     f"{'SM %':>6} {'mem %':>6}")
        launches = list(pred.launches)
        for name, metrics in kernels.items():
            short = next((kn for kn in NCU_KERNELS if kn in name), name[:24])
            secs = metrics.get("gpu__time_duration.sum", math.nan)
            moved = metrics.get("dram__bytes_read.sum", 0.0) + metrics.get("dram__bytes_write.sum", 0.0)
            model = _model_launch(short, launches)
            flops = model.flops if model else math.nan
            lines.append(
                f"{short:<24} {secs * 1e6:>8.1f} {(model.time(spec, torch.bfloat16) * 1e6 if model else math.nan):>9.1f} "
                f"{flops / secs / 1e12 if secs else math.nan:>8.1f} {moved / 1e9:>9.3f} "
                f"{(model.bytes / 1e9 if model else math.nan):>9.3f} "
                f"{metrics.get('sm__throughput.avg.pct_of_peak_sustained_elapsed', math.nan):>6.1f} "
                f"{metrics.get('gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed', math.nan):>6.1f}")
    text = "\n".join(lines) + "\n"
    (out / "ncu.txt").write_text(text)
    print(text)
    res.stage("ncu", report=lines)
    return 0


def _model_launch(kernel: str, launches):
    """The cost model's launch that a kernel name runs (forward GEMM, dx GEMM, reduction, thin passes)."""
    want = {"_lora_forward_kernel": "y = x W0ᵀ", "_lora_backward_kernel": "dx = dy W0", "_reduce_runs_kernel":
            "ordered sum", "_lora_shrink_kernel": "xa = s", "_lora_g_kernel": "g = "}.get(kernel)
    return next((launch for launch in launches if want and want in launch.name), None)


def stage_sanitize(out: Path, res: Results) -> int:
    """A few calls of each CUDA kernel family on awkward shapes (compute-sanitizer wraps this)."""
    from lora_kernels import backends

    why = backends.unavailable_reason("cuda", device())
    if why:
        print(f"skipped: {why}")
        return 0
    failed = 0
    for dname, family, shape in correctness_cases("cuda"):
        if shape == (LARGE if not DRY_RUN else DRY_LARGE) or dname == "fp16":
            continue
        errs = check_single("cuda", family, shape, DTYPES[dname])
        bad = max(errs.values()) > TOLERANCE[DTYPES[dname]]
        failed += bad
        print(f"cuda {family} {dname} {shape}: {'WRONG' if bad else 'ok'} {errs}")
    return 1 if failed else 0


def stage_autotune(out: Path, res: Results) -> int:
    """Run the layer at each headline shape with autotuning on; write each kernel's chosen config."""
    from lora_kernels import triton_ops

    lines = []
    layers, m = (DRY_LAYERS, DRY_TOKENS) if DRY_RUN else (HEADLINE_LAYERS, HEADLINE_TOKENS)
    for k, n in layers:
        for p in (0.0, HEADLINE_DROPOUT):
            layer, x = _headline_inputs(k, n, m, p)
            t0 = time.perf_counter()
            layer(x).backward(torch.randn(m, n, device=x.device, dtype=x.dtype))
            sync()
            lines.append(f"M={m} K={k} N={n} r={HEADLINE_RANK} p={p:g}: first call (compile + tune) "
                         f"{time.perf_counter() - t0:.1f} s")
    for name in ("forward", "backward"):
        for tma in (True, False):
            tuner = triton_ops._autotuned(name, tma)
            for key, cfg in getattr(tuner, "cache", {}).items():
                lines.append(f"{name} {'tma' if tma else 'pointer'} key={key}: {cfg}")
    text = "\n".join(lines) + "\n"
    (out / "autotune.txt").write_text(text)
    print(text)
    res.stage("autotune", choices=lines)
    return 0


# --------------------------------------------------------------------------- #
# Every stage: a Triton warning or a TMA fallback fails it, by name
# --------------------------------------------------------------------------- #


def tma_fallbacks() -> list:
    """The cases (kernel, dtype, shapes, strides) that fell back from the TMA kernel to the pointer
    kernel in this process (a stage is a process)."""
    ops = sys.modules.get("lora_kernels.triton_ops")
    if ops is None:
        return []
    listed = getattr(ops, "tma_fallbacks", None)
    return list(listed()) if listed else sorted(getattr(ops, "_TMA_FAILED_CASES", ()), key=repr)


def _from_triton(w: warnings.WarningMessage) -> bool:
    """A warning that Triton raised, or this package (its Triton launchers warn as "lora_kernels: ...")."""
    text = str(w.message)
    if text.startswith("lora_kernels") or "triton" in text.lower():
        return True
    where = Path(w.filename).resolve()
    roots = [Path(m.__file__).resolve().parent for m in (sys.modules.get("triton"), sys.modules.get("lora_kernels"))
             if m is not None and getattr(m, "__file__", None)]
    return any(where.is_relative_to(root) for root in roots)


@contextlib.contextmanager
def failing_on_triton_warnings(problems: list[str]):
    """Record every warning raised inside; append to ``problems`` each Triton one (category,
    message, where) and each TMA fallback of the process. Other warnings are printed once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                key = (w.category, str(w.message), w.filename, w.lineno)
                if key in seen:
                    continue
                seen.add(key)
                if _from_triton(w):
                    problems.append(f"Triton warning: {w.category.__name__}: {w.message} ({w.filename}:{w.lineno})")
                else:
                    print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip(), file=sys.stderr)
            problems += [f"TMA fallback to the pointer kernel: {case}" for case in tma_fallbacks()]


# --------------------------------------------------------------------------- #
# verify: what CI checks after the dry run
# --------------------------------------------------------------------------- #

MAX_FILES = 8  # what comes back from a GPU call
EXPECTED = {"first": ("summary.txt", "env.txt", "correctness.log", "headline.md", "bench.json", "build.log", "run.log"),
            "tune": ("summary.txt", "autotune.txt", "ncu.txt", "sanitizer.log", "bench.json", "build.log", "run.log")}


def verify(out: Path, mode: str) -> list[str]:
    """Problems with a finished run's OUTDIR (empty: none): the files, every stage's budget and
    time, no failed stage, the script's result line, no failed correctness check, the headline table."""
    problems = []
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back): {files}")
    problems += [f"{name} is missing" for name in EXPECTED[mode] if name not in files]
    summary = (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").exists() else []
    stages = [line for line in summary if " budget " in line]
    if not stages:
        problems.append("summary.txt names no stage")
    results = [line for line in summary if line.startswith("result: ")]
    if not results:
        problems.append("summary.txt has no 'result:' line: the run did not finish")
    elif results[-1] != "result: ok":
        problems.append(f"summary.txt: {results[-1]}")
    for line in stages:
        if "measured" not in line and "skipped" not in line:
            problems.append(f"stage without a measured time: {line!r}")
        elif "measured" in line and "rc=0" not in line:
            problems.append(f"stage failed: {line!r}")
    if mode == "first":
        head = (out / "headline.md").read_text() if (out / "headline.md").exists() else ""
        if not head.startswith("# headline"):
            problems.append("headline.md does not open with the heading 'headline'")
        for provider in ("base", "triton"):
            if f"| {provider} |" not in head:
                problems.append(f"headline.md has no {provider} row")
        res = Results(out)
        checks = res.rows("correctness")
        if not any(r["status"] == "ok" for r in checks):
            problems.append("no correctness check ran")
        problems += [f"correctness: {r['backend']} {r['family']} {r['dtype']} {r['shape']}: {r['status']} {r['detail']}"
                     for r in checks if r["status"] not in ("ok", "skipped")]
    return problems


# --------------------------------------------------------------------------- #


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/first_contact.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("env", "correctness", "headline", "extra", "ncu-target", "ncu-report",
                                      "sanitize", "autotune", "render", "verify", "warm", "train-step"))
    p.add_argument("--out", type=Path, required=True, help="the output folder (bench.json and the stage's file)")
    p.add_argument("--backend", default="triton", choices=("triton", "cuda", "reference"),
                   help="correctness, warm: which backend (reference: the float64 check of the check)")
    p.add_argument("--providers", default=",".join(HEADLINE_PROVIDERS), help="headline: comma list")
    p.add_argument("--stage-name", default="headline", help="headline: the rows' stage name in bench.json")
    p.add_argument("--csv", type=Path, help="ncu-report: ncu's --csv output")
    p.add_argument("--mode", default="first", choices=tuple(EXPECTED), help="verify: which run OUTDIR holds")
    p.add_argument("--warm-seconds", type=float, default=0.0,
                   help="correctness: compile ahead in worker processes for at most this long (0: not)")
    p.add_argument("--warm-workers", type=int, default=os.cpu_count() or 1,
                   help="correctness: how many worker processes compile ahead (default: one per core)")
    p.add_argument("--cases", default="", help="warm: the indices of the correctness cases this worker runs")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.rest = argv[cut + 1:]  # train-step: bench/train_step.py's arguments
    if args.stage == "verify":
        problems = verify(args.out, args.mode)
        print("\n".join(problems) if problems else f"{args.out}: the {args.mode} run is complete")
        return 1 if problems else 0
    if args.stage == "warm":
        return stage_warm(args.backend, [int(i) for i in args.cases.split(",") if i])
    args.out.mkdir(parents=True, exist_ok=True)
    res = Results(args.out)
    torch.manual_seed(0)
    if device().type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    problems: list[str] = []
    with failing_on_triton_warnings(problems):
        rc = run_stage(args, res)
    name = args.stage_name if args.stage == "headline" else args.stage
    for problem in problems:
        line = f"FAILED: {name}: {problem}"
        print(line, file=sys.stderr, flush=True)
        if args.stage == "correctness":
            with (args.out / "correctness.log").open("a") as f:
                f.write(line + "\n")
    if problems:
        res.stage(name, failures=problems)
    return 1 if problems else rc


def run_stage(args: argparse.Namespace, res: Results) -> int:
    if args.stage == "env":
        return stage_env(args.out, res)
    if args.stage == "correctness":
        return stage_correctness(args.out, res, args.backend, args.warm_workers, args.warm_seconds)
    if args.stage == "headline":
        return stage_headline(args.out, res, [s for s in args.providers.split(",") if s], args.stage_name)
    if args.stage == "extra":
        return stage_extra(args.out, res)
    if args.stage == "ncu-target":
        return stage_ncu_target(args.out, res)
    if args.stage == "ncu-report":
        return stage_ncu_report(args.out, res, args.csv or args.out / "ncu.csv")
    if args.stage == "sanitize":
        return stage_sanitize(args.out, res)
    if args.stage == "autotune":
        return stage_autotune(args.out, res)
    if args.stage == "train-step":  # here, so that its Triton warnings and TMA fallbacks count too
        from bench import train_step

        return train_step.main(args.rest)
    write_headline(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
