"""`mmscale model-info`: parameters, FLOPs per token and optimizer memory of a model config.

    mmscale model-info --config configs/tinystories-mixer.yaml
    mmscale model-info --config configs/tiny.yaml model.kind=transformer model.kv_heads=2 --json

The model is built on the meta device, so sizing a large config allocates no memory.
"""
from __future__ import annotations

import argparse
import json

import torch

from mmscale.config import load_config
from mmscale.models import TokenMixer, build_model

# bytes per parameter for parameters + AdamW state (gradients and activations not included)
ADAMW_BYTES = {
    "fp32": 4 + 4 + 4,      # fp32 params, two fp32 moments
    "bf16": 2 + 4 + 4 + 4,  # bf16 params, fp32 master copy, two fp32 moments
}
GRAD_BYTES = {"fp32": 4, "bf16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_info(model_cfg) -> dict:
    with torch.device("meta"):
        model = build_model(model_cfg)
    # the mask on the meta device has no values: count its lower triangle by hand
    T = model_cfg.n_ctx
    live = sum(m.heads * m.kernel_size * (T * (T + 1) // 2 if m.causal else T * T)
               for m in model.modules() if isinstance(m, TokenMixer))
    n = model.num_params()
    return {
        "model": {k: getattr(model_cfg, k) for k in ("kind", "d_model", "n_layers", "n_ctx", "vocab_size", "heads",
                                                        "kv_heads", "mixer", "kernel_size", "ffn_mult", "ffn_hidden",
                                                        "tie_embeddings", "bidirectional", "final_norm")},
        "parameters": model.param_breakdown(),
        "live_token_mixing_weights": live if model_cfg.kind == "mixer" else None,
        "flops_per_token": {"forward": model.flops_per_token(backward=False),
                            "training": model.flops_per_token(backward=True)},
        "memory_bytes_params_adamw": {p: n * b for p, b in ADAMW_BYTES.items()},
        "memory_bytes_grads": {p: n * b for p, b in GRAD_BYTES.items()},
    }


def _describe(c) -> str:
    if c["kind"] == "mixer":
        what = f"masked mixer ({c['mixer']}" + (f", {c['heads']} heads" if c["mixer"] == "multihead" else "")
        what += f", kernel {c['kernel_size']}, {'bidirectional' if c['bidirectional'] else 'causal'})"
    else:
        kv = c["kv_heads"] or c["heads"]
        what = f"Llama transformer ({c['heads']} heads, {kv} kv heads" + (", bidirectional)" if c["bidirectional"] else ")")
    return (f"{what}: d_model {c['d_model']}, {c['n_layers']} layers, n_ctx {c['n_ctx']}, "
            f"vocab {c['vocab_size']}, head {'tied' if c['tie_embeddings'] else 'untied'}")


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_info(info: dict) -> str:
    p, f = info["parameters"], info["flops_per_token"]
    mix_name = "token mixing" if info["model"]["kind"] == "mixer" else "attention"
    lines = [_describe(info["model"]), "", "parameters"]
    rows = [("embedding", p["embedding"]), (mix_name, p["mixing"]), ("FFN", p["ffn"]), ("norms", p["norm"]),
            ("head", p["head"]), ("total", p["total"])]
    for name, v in rows:
        note = ""
        if name == "token mixing" and info["live_token_mixing_weights"] is not None:
            note = f"   ({info['live_token_mixing_weights']:,} live under the causal mask)"
        if name == "head" and info["model"]["tie_embeddings"]:
            note = "   (tied to the embedding)"
        lines.append(f"  {name:<13}{v:>16,}{note}")
    mixer = info["model"]["kind"] == "mixer"
    dense_what = "full T x T mixing" if mixer else "full attention"
    causal_what = "live lower triangle only" if mixer else "causal half of attention"
    lines += ["", "FLOPs per token (matmuls, 2 per multiply-add; training = forward + backward = 3 x forward)",
              f"  {'':<40}{'forward':>16}{'training':>16}",
              f"  {'dense  (' + dense_what + ', T = n_ctx)':<40}{f['forward']['dense']:>16,}{f['training']['dense']:>16,}",
              f"  {'causal (' + causal_what + ')':<40}{f['forward']['causal']:>16,}{f['training']['causal']:>16,}",
              "", "memory of parameters + AdamW state (activations not included)"]
    m, g = info["memory_bytes_params_adamw"], info["memory_bytes_grads"]
    lines += [f"  fp32  (fp32 params + 2 fp32 moments, 12 B/param):                 {_gib(m['fp32']):>12}"
              f"   (+ {_gib(g['fp32'])} fp32 gradients)",
              f"  bf16  (bf16 params + fp32 master + 2 fp32 moments, 14 B/param):   {_gib(m['bf16']):>12}"
              f"   (+ {_gib(g['bf16'])} bf16 gradients)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
