"""The examples run as a user runs them: a subprocess from the repository root, on the CPU."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_peft_trainer_example_trains_saves_and_reloads_the_adapter():
    """examples/peft_trainer_llama.py: Trainer with gradient checkpointing on an accelerated PEFT model,
    the adapter saved and reloaded onto the base checkpoint gives the trained model's logits."""
    for module in ("peft", "transformers", "accelerate", "safetensors"):
        pytest.importorskip(module)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "examples/peft_trainer_llama.py", "--steps", "12"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "reload check passed", out[-3000:]
    assert "14 layer(s) accelerated, 0 left to PEFT" in done.stdout
    assert "(gradient checkpointing on)" in done.stdout
    assert "14 layer(s) accelerated again" in done.stdout
