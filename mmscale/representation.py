"""The paper's input-representation accuracy: how much of its input a model's hidden layer keeps.

    mmscale representation EXPORT --data stories.txt [--layer 2] [--samples 8] [--steps 500]

For a real input x (token embeddings) and the output y = blocks[:layer](x), start from a Gaussian
input z and run plain gradient descent on the L1 distance |blocks[:layer](z) - y| for 500 steps,
the learning rate falling linearly to a tenth of its start. Map z back to tokens through the
pseudo-inverse of the embedding matrix (z @ pinv(E) gives each position's coefficients over the
vocabulary) and count the positions whose true token is not among the 5 largest: the metric is
that fraction (0 = the input is fully recoverable, 1 = nothing is). Badger found ~0 for untrained
masked mixers and ~1 for untrained transformers.

Scale: as in the paper, the start is N(0, 1) and the learning rate absolute (0.02). The metric is
therefore not scale-free: a model whose embeddings are small (mmscale's transformer: std 0.02,
like HF Llama's, which the paper measured) is harder to invert than one with unit-variance
embeddings (the mixer's, nn.Embedding's default). `relative=True` (--relative-scale) expresses
the start and the learning rate in units of the embedding matrix's std instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmscale.errors import UserError
from mmscale.export.evaluate import iter_batches
from mmscale.export.format import load_export_with_tokenizer


def recover_tokens(inputs_embeds, embed_weight, top_k: int = 5):
    """Top-k token ids [B, L, k] of each position of `inputs_embeds` through pinv(embedding)."""
    inverse = torch.linalg.pinv(embed_weight.double())         # [d, V]
    coeffs = inputs_embeds.double() @ inverse                  # [B, L, V]
    return coeffs.topk(top_k, dim=-1).indices


def representation_error(model, input_ids, *, layer: int | None = None, steps: int = 500, lr: float = 0.02,
                         top_k: int = 5, ignore_id: int | None = None, seed: int = 0, relative: bool = False,
                         progress: bool = False) -> dict:
    """Fraction of positions of `input_ids` [B, L] whose token is not in the top-k recovered ones.

    `layer` = number of blocks whose output is matched (default: all blocks, without the final norm).
    Positions holding `ignore_id` (padding) are not counted. `relative`: see the module docstring.
    """
    n_layers = model.config.n_layers
    layer = n_layers if layer is None else layer
    if not 1 <= layer <= n_layers:
        raise UserError(f"--layer must be between 1 and the model's {n_layers} blocks, got {layer}")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    model.eval()
    was_trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients flow to the input only
        p.requires_grad_(False)
    embed_weight = model.embed.weight.detach().float()
    scale = float(embed_weight.std()) if relative else 1.0
    with torch.no_grad():
        target = model.hidden(input_ids, upto=layer).float()

    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(target.shape, generator=gen) * scale).to(target.device)
    start_lr, end_lr = lr * scale, lr * scale / 10
    losses = []
    for i in tqdm(range(steps), desc="representation", unit="step", disable=not progress,
                  file=sys.stderr, leave=False):
        z.requires_grad_(True)
        loss = (model.hidden(inputs_embeds=z, upto=layer).float() - target).abs().sum()
        (grad,) = torch.autograd.grad(loss, z)
        step_lr = start_lr * (steps - i) / steps + end_lr * i / steps
        z = (z.detach() - step_lr * grad)
        losses.append(loss.item())

    for p, flag in zip(model.parameters(), was_trainable):
        p.requires_grad_(flag)
    recovered = recover_tokens(z.detach(), embed_weight, top_k)          # [B, L, k]
    hit = (recovered == input_ids.unsqueeze(-1)).any(-1)
    counted = torch.ones_like(hit) if ignore_id is None else input_ids != ignore_id
    n = int(counted.sum())
    if n == 0:
        raise UserError("no position to score (every token is padding); pass longer texts")
    misses = int((~hit & counted).sum())
    return {"error": misses / n, "positions": n, "layer": layer, "steps": steps, "top_k": top_k,
            "l1_start": losses[0], "l1_end": losses[-1]}


# ---------------------------------------------------------------------------------------------
# `mmscale representation`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="an export folder (mmscale convert)")
    parser.add_argument("--data", nargs="+", required=True, metavar="DATASET_OR_FILE",
                        help="a prepared dataset folder, or .txt/.jsonl files; the first windows are used")
    parser.add_argument("--layer", type=int, default=0, help="match the output of this many blocks (0 = all)")
    parser.add_argument("--samples", type=int, default=8, help="number of windows of n_ctx tokens")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.02, help="start learning rate (falls linearly to a tenth)")
    parser.add_argument("--relative-scale", action="store_true",
                        help="start and learning rate in units of the embedding std (default: the paper's N(0, 1))")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")


def run(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    model, _, sp = load_export_with_tokenizer(args.export)
    n_ctx = model.config.n_ctx
    rows = [b["input_ids"] for b in iter_batches(args.data, sp, n_ctx, args.samples, max_batches=1)]
    if not rows:
        raise UserError(f"{' '.join(args.data)} gave no window of tokens; pass more text")
    input_ids = torch.cat(rows)[:args.samples]
    pad = sp.pad_id()
    result = representation_error(model, input_ids, layer=args.layer or None, steps=args.steps, lr=args.lr,
                                  top_k=args.top_k, ignore_id=pad if pad >= 0 else None, seed=args.seed,
                                  relative=args.relative_scale,
                                  progress=True)
    print(f"representation error {result['error']:.4f} (fraction of {result['positions']} positions whose token "
          f"is not in the top {result['top_k']} recovered; layer {result['layer']}, {result['steps']} steps, "
          f"L1 {result['l1_start']:.4g} -> {result['l1_end']:.4g})")
    if args.json:
        Path(args.json).write_text(json.dumps({"export": str(args.export), **result}, indent=2) + "\n")
    return 0
