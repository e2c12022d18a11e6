"""`mmscale generate EXPORT --prompt TEXT`: sample text from an export.

The masked mixer has a fixed window of n_ctx positions, so (as in the paper) it fills that window
in place: the prompt sits at the start, padding after it, and position i is predicted from the
logits at i - 1; generation stops when the window is full. The transformer generates normally,
keeping the last n_ctx tokens as its context (no KV cache: each step recomputes the context).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from mmscale.errors import UserError
from mmscale.export.format import load_export_with_tokenizer


MIN_TEMPERATURE = 1e-2  # below this, logits / temperature overflow float32 for ordinary logits


def sample_next(logits, temperature: float, top_k: int, generator):
    """One token id per row of `logits` [B, V]: greedy at temperature 0, else top-k sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0, eos_id: int = -1, pad_id: int = 0) -> list[int]:
    """New token ids after `prompt_ids` (the prompt itself not included)."""
    cfg = model.config
    n_ctx = cfg.n_ctx
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens; give a prompt (or use a tokenizer with an EOS token)")
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    with torch.no_grad():
        if cfg.kind == "mixer":
            if len(prompt_ids) >= n_ctx:
                raise UserError(f"the prompt has {len(prompt_ids)} tokens but the mixer's window holds {n_ctx}; "
                                f"shorten the prompt to under {n_ctx} tokens")
            window = torch.full((1, n_ctx), max(pad_id, 0), dtype=torch.long)
            window[0, :len(prompt_ids)] = torch.tensor(prompt_ids)
            for i in range(len(prompt_ids), min(n_ctx, len(prompt_ids) + max_new_tokens)):
                # causal mixing: the padding at positions >= i cannot change the logits at i - 1
                logits = model(window)[:, i - 1]
                tok = int(sample_next(logits, temperature, top_k, generator))
                window[0, i] = tok
                new.append(tok)
                if tok == eos_id:
                    break
        else:
            ids = list(prompt_ids)
            for _ in range(max_new_tokens):
                context = torch.tensor([ids[-n_ctx:]], dtype=torch.long)
                logits = model(context)[:, -1]
                tok = int(sample_next(logits, temperature, top_k, generator))
                ids.append(tok)
                new.append(tok)
                if tok == eos_id:
                    break
    return new


def continuation_text(sp, prompt_ids: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoded together with the prompt and cut after the prompt's
    own text: decoded alone, a continuation's first piece loses its leading space ("▁their" -> "their")."""
    eos = sp.eos_id()
    body = [t for t in prompt_ids if t != eos]
    tail = [t for t in new if t != eos]
    head = sp.decode(body) if body else ""
    full = sp.decode(body + tail) if body else sp.decode(tail)
    return full[len(head):] if full.startswith(head) else sp.decode(tail)


# ---------------------------------------------------------------------------------------------
# `mmscale generate`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="an export folder (mmscale convert)")
    parser.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}", 2)
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise UserError(f"--temperature {args.temperature} is too small to sample with (the logits overflow); "
                        f"use 0 for greedy decoding or a value >= {MIN_TEMPERATURE}", 2)
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    model, _, sp = load_export_with_tokenizer(args.export)
    # training data is documents each followed by EOS (no BOS): an EOS first starts a new document
    eos = sp.eos_id()
    prompt_ids = ([eos] if eos >= 0 else []) + sp.encode(args.prompt)
    for n in range(max(1, args.num_samples)):
        new = generate_ids(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                           seed=args.seed + n, eos_id=sp.eos_id(), pad_id=sp.pad_id())
        if model.config.kind == "mixer" and len(prompt_ids) + len(new) >= model.config.n_ctx:
            print(f"(window of {model.config.n_ctx} tokens full)", file=sys.stderr)
        text = continuation_text(sp, prompt_ids, new)
        if n:
            print("-" * 40)
        print(args.prompt + text)
    return 0
