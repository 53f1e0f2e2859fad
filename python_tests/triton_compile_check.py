"""Compile every Triton kernel for a real GPU target, without a GPU (run by test_triton_compile.py).

The interpreter that runs the kernels on the CPU is lenient about types that the GPU compiler
rejects (an fp64 accumulator with fp32 operands, say), so CI also compiles each kernel for
sm_90 and sm_80, down to PTX and cubin, and checks that the Hopper GEMM really uses wgmma and
TMA. Usage: python triton_compile_check.py ARCH DTYPE   (e.g. 90 bf16)
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_kernels import triton_ops as T  # noqa: E402
from lora_kernels.multi_lora import triton_ops as MT  # noqa: E402

arch, dt = int(sys.argv[1]), sys.argv[2]
TARGET = GPUTarget("cuda", arch, 32)
HALF = dt in ("fp16", "bf16")
FLAGS = dict(ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32, UPCAST=False, IEEE=not HALF)


def build(fn, types, consts, num_stages=3):
    """Compile ``fn`` (pointer/scalar types by name, the rest i32) and return its PTX."""
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options=dict(num_stages=num_stages)).asm["ptx"]


def ptrs(*names, dtype=dt):
    return {n: f"*{dtype}" for n in names}


# The launch parameters the launchers use (largest tiles of the autotuning lists for half types).
bm, bn, bk = (128, 256, 64) if HALF else (128, 64, 32)
for dropout in (False, True):
    gemm = dict(HAS_BIAS=True, DROPOUT=dropout, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, GROUP_M=8, **FLAGS)
    build(T._gemm_lora_up_kernel,
          dict(ptrs("x_ptr", "w_ptr", "bias_ptr", "l_ptr", "u_ptr", "c_ptr"), inv_keep="fp32", seed_ptr="*i64"), gemm)
    for reduce_rows in (False, True):
        block_a, block_t = (128, 64) if reduce_rows else (64, 128)
        stages = 2 if dt == "fp64" else 3
        build(T._lora_skinny_kernel, dict(ptrs("p_ptr", "q_ptr", "out_ptr"), scale="fp32", seed_ptr="*i64"),
              dict(REDUCE_ROWS=reduce_rows, DROPOUT=dropout, BLOCK_A=block_a,
                   BLOCK_T=block_t // (2 if dt == "fp64" else 1), BLOCK_R=16, **FLAGS), num_stages=stages)
    if HALF and arch >= 90:
        for w_kn in (False, True):
            w_block = f"[{bk}, {bn}]" if w_kn else f"[{bn}, {bk}]"
            ptx = build(T._gemm_lora_up_tma_kernel,
                        dict(ptrs("bias_ptr", "l_ptr", "u_ptr", "c_ptr"), x_desc=f"tensordesc<{dt}[{bm}, {bk}]>",
                             w_desc=f"tensordesc<{dt}{w_block}>", inv_keep="fp32", seed_ptr="*i64"),
                        dict(gemm, W_KN=w_kn, NUM_PROGRAMS=132))
            assert "wgmma" in ptx and "cp.async.bulk.tensor" in ptx, "the Hopper GEMM lost wgmma or TMA"
    # Multi-adapter kernels.
    build(MT._sgmv_shrink_kernel,
          dict(ptrs("p_ptr", "q_ptr", "out_ptr"), scale_ptr="*fp32", order_ptr="*i64", seg_ptr="*i64",
               coeff="fp32", seed_ptr="*i64"),
          dict(DROPOUT=dropout, BLOCK_M=64, BLOCK_T=128, BLOCK_R=16, BLOCK_S=16, **FLAGS))
    build(MT._sgmv_reduce_kernel,
          dict(ptrs("p_ptr", "q_ptr"), order_ptr="*i64", seg_ptr="*i64", part_ptr="*fp32", seed_ptr="*i64"),
          dict(DROPOUT=dropout, BLOCK_J=128, BLOCK_T=64, BLOCK_R=16, BLOCK_S=16, **FLAGS))
    for load_c in (False, True):
        build(MT._sgmv_gemm_kernel,
              dict(ptrs("x_ptr", "w_ptr", "bias_ptr", "l_ptr", "u_ptr", "c_ptr"), ids_ptr="*i64", order_ptr="*i64",
                   inv_keep="fp32", seed_ptr="*i64"),
              dict(HAS_BIAS=True, DROPOUT=dropout, LOAD_C=load_c, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16,
                   GROUP_M=8, **FLAGS))
factor = "fp64" if dt == "fp64" else "fp32"
build(T._merge_kernel, dict(w_ptr=f"*{dt}", u_ptr=f"*{factor}", v_ptr=f"*{factor}", scale="fp32"),
      dict(ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32, UPCAST=False, IEEE=True,
           BLOCK_N=64, BLOCK_K=128, BLOCK_R=16))
build(MT._segment_sum_kernel, dict(part_ptr="*fp32", seg_ptr="*i64", out_ptr=f"*{dt}", coeff="fp32"),
      dict(ACC_DTYPE=tl.float32, BLOCK_J=64, BLOCK_R=64, BLOCK_S=16))
print(f"compiled every kernel for sm_{arch} {dt}")
