"""Fine-tune a tiny Llama-style model with lora_kernels: one apply_lora call, a few AdamW steps.

The model is built from a ``LlamaConfig`` with random weights (nothing is
downloaded) and trained to memorise one fixed batch, so the loss falls within a
few steps. Runs on CPU in seconds; on a GPU it uses bf16 and the fused kernels::

    python examples/train_llama_lora.py --steps 20
"""

from __future__ import annotations

import argparse

import torch

import lora_kernels as lk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, dtype=torch.float32,
               device="cpu"):
    """A randomly initialised ``LlamaForCausalLM`` (the seed fixes its weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def train(steps=20, batch=4, seq=32, r=8, alpha=16, dropout=0.05, lr=1e-2, seed=0, device=None, dtype=None,
          log=print):
    """Train the LoRA factors of a tiny Llama on one fixed batch; returns the losses."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    model = tiny_llama(dtype=dtype, device=device)
    # One call: every attention and MLP projection becomes a LoRALinear; everything else is frozen.
    lk.apply_lora(model, TARGETS, r=r, alpha=alpha, dropout=dropout, lora_dtype=torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"trainable parameters: {sum(p.numel() for p in trainable)} of {sum(p.numel() for p in model.parameters())}")
    opt = torch.optim.AdamW(trainable, lr=lr)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    model.train()
    losses = []
    for step in range(steps):
        # fp32 LoRA masters with a bf16 base: autocast computes in bf16 (see docs/integration.md, dtype rules)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        log(f"step {step:3d}  loss {losses[-1]:.4f}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    losses = train(steps=args.steps, r=args.rank, device=args.device)
    if not losses[-1] < losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
