"""torch.compile(fullgraph=True) smoke test for the compatibility runner (ci/compat.sh).

A two-layer model of LoRALinear with dropout, compiled whole (no graph break allowed) with
``aot_eager`` and ``inductor``, forward and backward, plain and under bf16 autocast, for every
backend that can run here; the compiled results must equal eager ones (the same dropout seed is
drawn in both, from the same generator state). Prints one line per case and exits non-zero on
any failure.

    python ci/compat_smoke.py
"""

import os
import sys
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import lora_kernels as lk  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        lk.LoRALinear(16, 24, r=4, alpha=8, dropout=0.25, backend=backend, device=DEVICE),
        torch.nn.GELU(),
        lk.LoRALinear(24, 8, bias=False, r=2, alpha=4, dropout=0.25, backend=backend, device=DEVICE),
    )
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B.weight)
    return model


def step(model, x, autocast: bool):
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout seeds in eager and compiled runs
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().mean().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return [y.float()] + [g.float() for g in grads]


def check(backend: str, compile_backend: str, autocast: bool) -> None:
    model = make_model(backend)
    x = torch.randn(2, 5, 16, device=DEVICE)
    expected = step(model, x, autocast)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    got = step(compiled, x, autocast)
    tol = 2e-2 if autocast else 1e-5
    for i, (a, b) in enumerate(zip(got, expected)):
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        if not err <= tol:
            raise AssertionError(f"output {i}: relative error {err:.3g} > {tol}")


def main() -> int:
    backends = lk.available_backends(DEVICE)
    print(f"torch {torch.__version__}; device {DEVICE}; backends {backends}")
    failures = 0
    for backend in backends:
        for compile_backend in ("aot_eager", "inductor"):
            for autocast in (False, True):
                case = f"{backend:9s} {compile_backend:9s} autocast={autocast!s:5s}"
                try:
                    check(backend, compile_backend, autocast)
                    print(f"ok    {case}", flush=True)
                except Exception:  # noqa: BLE001  (report every case, then fail)
                    failures += 1
                    print(f"FAIL  {case}\n{traceback.format_exc(limit=-3)}", flush=True)
    total = 4 * len(backends)
    print(f"compile smoke: {total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
