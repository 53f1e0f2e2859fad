"""Compile every autotune config of every Triton kernel for sm_90a and sm_80, as the JIT would,
without a GPU (run by test_triton_compile.py; CI runs it on the CPU).

The launchers themselves run, on small CPU tensors, with the launches intercepted: each
``kernel[grid](...)`` records its arguments instead of running. Every recorded launch is then
compiled for the target the way ``JITFunction.run`` compiles it (the same binder: sizes and
strides divisible by 16 marked as such, unit strides as the constant 1, ``None`` operands as
constants), once per autotuning config that survives the launcher's shared-memory pruning for
that GPU. For each it prints registers, spill bytes (the cubin's stack frame, from cuobjdump),
shared memory, and for the GEMMs whether the main loop uses wgmma and TMA copies (PTX).

It fails on any register spill (fp64, a gradcheck dtype, is reported only), on shared memory
beyond the GPU's, and when a TMA kernel for sm_90a loses wgmma or its TMA copies. The launchers
never autotune over a config that spilled for that kernel variant: ``--update`` compiles
everything and rewrites their exclusion table, lora_kernels/_triton_excluded.py (run it after
changing a kernel or a config list, on every Triton of the support matrix, then commit the table:
register allocation differs between Triton releases, so each version has its own entry, and a
version without one gets all of them together). The table is measured at r = 16.

Every rank of RANKS is compiled (r = 8 ... 256: the rank blocks and chunks are what change).
Beside the table, the launchers prune by a rank-aware estimate of shared memory and registers
(``triton_ops._fits``); the check prints its verdict for every config ("rule": fit / drop) and
fails where a config it keeps spills. ``--all`` compiles the configs it drops too, and counts
where the estimate and the compiler disagree (a dropped config that compiles clean costs only a
candidate; a kept one that spills fails the check).

Usage: python triton_compile_check.py [--jobs N] [--ranks 8,16,...] [--all | --first-config] [--update | --self-test]
(~300 compilations per rank at r <= 16, fewer above (fewer configs fit): about 1,200 in all,
~15 CPU-minutes; seconds with a warm Triton cache.)
"""

import argparse
import functools
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from lora_kernels import triton_ops as T  # noqa: E402
from lora_kernels.multi_lora import reference as multi_reference  # noqa: E402
from lora_kernels.multi_lora import triton_ops as MT  # noqa: E402

# shared_memory_per_block_optin of the H100 and the A100: what the launchers prune configs by.
SHARED_MEMORY = {90: 232448, 80: 166912}
# (arch, dtype, the GEMMs' load modes): the dtypes each GPU's users run; on Hopper bf16 runs the
# TMA kernels, and the pointer ones for operands that TMA cannot address.
# fp16 compiles to the same registers as bf16 (it shares their exclusions); fp64 is for gradcheck:
# its spills are reported, not failed.
TARGETS = [(90, torch.bfloat16, (True, False)), (90, torch.float32, (False,)), (90, torch.float64, (False,)),
           (80, torch.bfloat16, (False,))]
# The ranks compiled: r = 8 (not a multiple of 16: other specialisations), the table's r = 16, and
# the ranks whose blocks the budgets must count (r = 64: the fused forward's widest; 128 and 256: the
# rank chunks).
RANKS = (8, 16, 64, 128, 256)
# Where the rank-aware budgets are calibrated: the single-adapter TMA GEMMs on sm_90a in bf16 (their
# figures at r = 16, 64, 128 and 256). Elsewhere a spill above the table's rank (r > 16) is listed as
# a gap of the estimate, not failed: the pointer and fp32 FMA tiles, sm_80, the multi-adapter GEMM
# and the fixed launches (merge, shrink) are not calibrated yet. --strict fails on those too.
CALIBRATED = {(90, torch.bfloat16, "_lora_forward_kernel"), (90, torch.bfloat16, "_lora_backward_kernel")}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# --------------------------------------------------------------------------- #
# Recording the launches of the real launchers
# --------------------------------------------------------------------------- #

LAUNCHES = []  # (kernel JITFunction, named arguments, configs or None, the configs the pruning keeps)


def _record_jit(self, *args, grid, warmup, **kwargs):
    named = dict(zip(self.arg_names, args), **kwargs)
    LAUNCHES.append((self, named, None, None))


# --all: every config of every autotuned launch, not only those that the launchers' pruning keeps
# (to compare the pruning's estimate with what the compiler does).
EVERY_CONFIG = False
# --first-config: of each autotuned launch only the first config the pruning keeps, the one the
# launcher runs without autotuning (LORA_KERNELS_AUTOTUNE=0, the GPU's first correctness stage):
# every kernel variant compiled once, in about a tenth of the time.
FIRST_CONFIG = False


def _record_autotuned(self, *args, grid=None, warmup=False, **kwargs):
    named = dict(zip(self.arg_names, args), **kwargs)
    kept = self.early_config_prune(self.configs, named) if self.early_config_prune else self.configs
    LAUNCHES.append((self.fn, named, self.configs if EVERY_CONFIG else kept[:1] if FIRST_CONFIG else kept, kept))


def record(dtype, arch, tma, r=16):
    """Run every launcher on small CPU tensors of ``dtype`` at rank ``r`` and return the launches they make."""
    JITFunction.run, Autotuner.run = _record_jit, _record_autotuned
    T._shared_memory_limit = lambda device: SHARED_MEMORY[arch]
    T._target_arch = lambda device: arch
    T.USE_TMA = tma
    del LAUNCHES[:]
    torch.manual_seed(0)
    # Sizes divisible by 16 (the common case, and what the JIT specialises on).
    M, K, N, n = 256, 512, 384, 3
    x, dy = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype)
    w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    A, B, xa = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype), torch.randn(M, r, dtype=dtype)
    seed = torch.tensor(7)
    for p, plan in itertools.product((0.0, 0.1), ("fused", "two_pass")):
        T.FORWARD_PLAN = plan
        T.lora_forward(x, w, b, A, B, 0.5, p, seed)
    for p, need_grad_x, plan in itertools.product((0.0, 0.1), (True, False), ("fused", "g_pass")):
        T.BACKWARD_PLAN = plan
        T.lora_backward(dy, x, w, A, B, xa, 0.5, p, seed, need_grad_x)
    T.lora_merge_(w, A.to(torch.float64 if dtype == torch.float64 else torch.float32), B.float(), 0.5)
    ids = torch.arange(M) % (n + 1) - 1
    order, seg = multi_reference.segments(ids, n)
    As, Bs, s = torch.randn(n, r, K, dtype=dtype), torch.randn(n, N, r, dtype=dtype), torch.rand(n)
    for p, fused in itertools.product((0.0, 0.1), (True, False)):
        MT.FUSED_GEMM = fused
        MT.multi_lora_forward(x, w, b, As, Bs, s, ids, order, seg, p, seed)
        MT.multi_lora_backward(dy, x, w, As, Bs, s, xa, ids, order, seg, p, seed, True)
    return list(LAUNCHES)


# --------------------------------------------------------------------------- #
# Compiling as the JIT does
# --------------------------------------------------------------------------- #


def compile_as_jit(fn, named, arch):
    """``fn`` compiled for ``arch`` with the arguments ``named`` (and launch options), through the
    binder and argument packing that ``JITFunction.run`` uses."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**named)
    pack = getattr(fn, "_pack_args", None) or functools.partial(_pack_args, fn)
    options, signature, constexprs, attrs = pack(backend, named, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _pack_args(fn, backend, kwargs, bound_args, specialization, options):
    """What ``JITFunction._pack_args`` does (Triton >= 3.5), for Triton 3.4, whose ``run`` inlines
    the same steps: launch options, the signature's types, constexpr values and the arguments'
    specialisation attributes."""
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = {p.name: v for p, v in zip(fn.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


def resources(cubin: bytes):
    """(registers, spill bytes) of the kernel in ``cubin``, from cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, stack + local


def _flags(named):
    keys = ("FUSED", "NEED_DX", "G_LOADED", "CHUNKED", "LOAD_C", "REDUCE_ROWS", "DROPOUT", "TMA")
    return " ".join(f"{k}={int(bool(named[k]))}" for k in keys if k in named)


def jobs_for(arch, dtype, tma_modes, r=16):
    """Distinct (name, flags, config, named arguments) compilations for one target and rank."""
    jobs, seen = [], set()
    launches = [launch for tma in tma_modes for launch in record(dtype, arch, tma, r)]
    for fn, named, configs, kept in launches:
        for cfg in configs or [None]:
            args = dict(named)
            if cfg is not None:
                args.update(cfg.all_kwargs())
                if cfg.pre_hook is not None:
                    cfg.pre_hook(args)
                args = {k: v for k, v in args.items() if k != "pre_hook"}
                label = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + \
                    f" s{cfg.num_stages} w{cfg.num_warps}"
            else:
                blocks = [f"{k}={v}" for k, v in args.items() if k.startswith("BLOCK_")]
                opts = [f"{k[4]}{args[k]}" for k in ("num_stages", "num_warps") if k in args]
                label = " ".join(blocks + opts)
            label = f"r{args.get('R', '-')} {label}"
            key = (fn.__name__, _flags(args), label, str(dtype))
            if key not in seen:
                seen.add(key)
                # Descriptors are shared between configs: freeze this config's block shapes.
                args = {k: (_copy_descriptor(v) if _is_descriptor(v) else v) for k, v in args.items()}
                exclusion = None if cfg is None else T.config_key(
                    fn.__name__, arch, torch.empty((), dtype=dtype).element_size(), named, cfg)
                jobs.append((arch, dtype, fn.__name__, _flags(args), label, fn, args, exclusion,
                             cfg is None or cfg in kept))
    return jobs


def _is_descriptor(v):
    return type(v).__name__ == "TensorDescriptor"


def _copy_descriptor(d):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(d.base, d.shape, d.strides, list(d.block_shape))


JOBS = []


def run_job(i):
    arch, dtype, name, flags, label, fn, args = JOBS[i][:7]
    start = time.time()
    try:
        kernel = compile_as_jit(fn, args, arch)
    except Exception as exc:  # reported as a failure below
        return i, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", time.time() - start
    regs, spill = resources(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    return i, (regs, spill, kernel.metadata.shared, "wgmma" in ptx, "cp.async.bulk.tensor" in ptx), "", \
        time.time() - start


def _rule(job):
    """The launchers' rank-aware estimate for an autotuned job: True (kept), False (dropped), None
    (not an autotuned config)."""
    arch, dtype, name, flags, label, fn, args, exclusion = job[:8]
    if exclusion is None:
        return None
    backward = "backward" in name
    element_size = torch.empty((), dtype=dtype).element_size()
    cfg = _Config(args)
    return T._fits(cfg, args, backward, element_size, SHARED_MEMORY[arch])


class _Config:
    """The block sizes, stages and warps of a job, as _fits reads a triton.Config."""

    def __init__(self, args):
        self.kwargs = {k: args[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        self.num_stages, self.num_warps = args["num_stages"], args["num_warps"]


def self_test():
    """The check can fail: a config far too big for its warps must report spills."""
    fn, named, configs, _ = next(launch for launch in record(torch.bfloat16, 90, False)
                              if launch[0] is T._lora_forward_kernel and launch[1]["FUSED"])
    args = dict(named, BLOCK_M=256, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    regs, spill = resources(compile_as_jit(fn, args, 90).asm["cubin"])
    print(f"256x256x64 with 4 warps: {regs} registers, {spill} bytes of spills")
    sys.exit(0 if spill > 0 else 1)


def write_exclusions(path, by_version):
    """Write lora_kernels/_triton_excluded.py: per Triton version (major.minor), the excluded configs."""
    def order(v):
        return tuple(int(p) for p in v.split("."))

    with open(path, "w") as f:
        f.write("# Generated by `python python_tests/triton_compile_check.py --update` (each run rewrites the entry of\n"
                "# the Triton it runs on); do not edit. Per Triton version (major.minor):\n"
                f"# (kernel, arch, operand bytes, ({', '.join(T.VARIANT_FLAGS)}), "
                "(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)):\n"
                "# autotuning configs that spill registers or overflow shared memory there.\n"
                "EXCLUDED_BY_TRITON = {\n")
        for version in sorted(by_version, key=order):
            f.write(f"    {version!r}: {{\n" + "".join(f"        {key!r},\n" for key in sorted(by_version[version]))
                    + "    },\n")
        f.write("}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--self-test", action="store_true", help="check that a spilling config is caught")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks to compile")
    parser.add_argument("--strict", action="store_true",
                        help="fail on spills above r = 16 where the budgets are not calibrated, too")
    parser.add_argument("--all", action="store_true",
                        help="compile every config, also those the rank-aware estimate drops, and compare")
    parser.add_argument("--first-config", action="store_true",
                        help="of each autotuned launch only the first config the pruning keeps (the one run "
                             "without autotuning): every kernel variant once")
    parser.add_argument("--update", action="store_true",
                        help="compile every config and rewrite lora_kernels/_triton_excluded.py with the "
                             "autotuning configs that spill or overflow shared memory")
    opts = parser.parse_args()
    if opts.self_test:
        self_test()
    global EVERY_CONFIG, FIRST_CONFIG
    EVERY_CONFIG, FIRST_CONFIG = opts.all, opts.first_config
    if opts.first_config and (opts.all or opts.update):
        parser.error("--first-config compiles one config per launch: not with --all or --update")
    ranks = [int(r) for r in opts.ranks.split(",")]
    if opts.update:
        T._EXCLUDED = set()
        if 16 not in ranks:
            parser.error("--update writes the table measured at r = 16: include 16 in --ranks")
    start = time.time()
    for r in ranks:
        for arch, dtype, tma_modes in TARGETS:
            JOBS.extend(jobs_for(arch, dtype, tma_modes, r))
    with multiprocessing.get_context("fork").Pool(opts.jobs) as pool:
        results = sorted(pool.imap_unordered(run_job, range(len(JOBS))))
    failures, gaps, excluded, disagree = [], [], set(), {"keeps, spills": 0, "drops, fits": 0}
    print(f"{'target':<15} {'kernel':<22} {'variant':<28} {'config':<24} {'regs':>4} {'spill':>5} "
          f"{'smem':>6} wgmma tma rule")
    for i, res, error, _ in results:
        arch, dtype, name, flags, label, fn, args, exclusion, launched = JOBS[i]
        target = f"sm_{arch}{'a' if arch == 90 else ''} {str(dtype)[6:]}"
        if res is None:
            failures.append(f"{target} {name} {flags} {label}: does not compile: {error}")
            print(f"{target:<15} {name:<22} {flags:<28} {label:<24} FAILED: {error}")
            continue
        regs, spill, smem, wgmma, tma = res
        fits = _rule(JOBS[i])
        print(f"{target:<15} {name:<22} {flags:<28} {label:<24} {regs:>4} {spill:>5} {smem:>6} "
              f"{'yes' if wgmma else 'no':<5} {'yes' if tma else 'no':<3} {'' if fits is None else 'fit' if fits else 'drop'}")
        too_big = smem > SHARED_MEMORY[arch]
        if (spill or too_big) and exclusion is not None and args.get("R", 0) <= 16:  # the table's bucket: r <= 16
            excluded.add(exclusion)
        if fits is not None and dtype != torch.float64:
            if fits and (spill or too_big):
                disagree["keeps, spills"] += 1
            elif not fits and not (spill or too_big):
                disagree["drops, fits"] += 1
        if not launched:
            continue  # compiled with --all only, to compare: the pruning drops it
        if spill and dtype != torch.float64:
            calibrated = (args.get("R", 0) <= 16 or opts.strict
                          or ((arch, dtype, name) in CALIBRATED and bool(args.get("TMA"))))
            (failures if calibrated else gaps).append(
                f"{target} {name} {flags} {label}: {spill} bytes of register spills")
        if too_big:
            failures.append(f"{target} {name} {flags} {label}: {smem} bytes of shared memory")
        # NOTE: without dx, g from the g pass (r > 64) leaves no big GEMM: its small dots need no wgmma.
        needs_wgmma = not (name == "_lora_backward_kernel" and not args.get("NEED_DX") and args.get("G_LOADED"))
        if args.get("TMA") and arch == 90 and not (tma and (wgmma or not needs_wgmma)):
            failures.append(f"{target} {name} {flags} {label}: the TMA kernel lost wgmma or its TMA copies")
    print(f"{len(results)} compilations in {time.time() - start:.0f} s with {opts.jobs} processes")
    print("the rank-aware estimate against the compiler (autotuned configs, fp64 aside): "
          + ", ".join(f"{k}: {v}" for k, v in disagree.items()))
    if opts.update:
        path = os.path.join(os.path.dirname(T.__file__), "_triton_excluded.py")
        version = ".".join(triton.__version__.split(".")[:2])
        write_exclusions(path, dict(T.EXCLUDED_BY_TRITON, **{version: excluded}))
        print(f"wrote {len(excluded)} excluded configs for Triton {version} to {path}")
        return
    if gaps:
        print(f"{len(gaps)} spills above r = 16 where the budgets are not calibrated (--strict fails on them):\n  "
              + "\n  ".join(gaps))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("every config compiles without spills")


if __name__ == "__main__":
    main()
