#!/usr/bin/env python
"""Import a llama2.c checkpoint (legacy version-0 `.bin`) as an mmscale export of the Llama baseline.

    python tools/import_llama2c.py stories260K.bin --tokenizer tok512.model --out exports/stories260K --sample

The .bin file: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
vocab_size means the classifier is stored separately), then float32 arrays in this order: token embedding,
attention RMS weights (all layers), wq, wk, wv, wo, FFN RMS weights, w1, w2, w3, final RMS weight,
freq_cis real and imag (skipped: mmscale computes RoPE itself), then the classifier if not shared.

llama2.c rotates adjacent pairs of dimensions (2m, 2m + 1) with RoPE; mmscale's LlamaLM uses the
rotate-half layout (m, m + head_dim / 2). The rows of wq and wk are permuted on import so that the
imported model computes exactly llama2.c's function.

With --sample it prints the greedy continuation from BOS: for stories260K it must begin
"Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmscale.config import ModelConfig  # noqa: E402
from mmscale.errors import UserError  # noqa: E402
from mmscale.export.format import save_export  # noqa: E402
from mmscale.models import build_model  # noqa: E402

HEADER = struct.Struct("<7i")


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection, per head, from pairs (2m, 2m+1) to (m, m + hd/2)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_llama2c(path: Path) -> tuple[ModelConfig, dict]:
    """Parse a llama2.c .bin into (ModelConfig, state dict of LlamaLM)."""
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise UserError(f"'{path}' is too short to be a llama2.c checkpoint (no 28-byte header)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise UserError(f"'{path}' has an implausible llama2.c header {HEADER.unpack_from(raw)}; "
                        "only the legacy (version 0) llama2.c format is supported")
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    shapes = [("embed", (vocab, dim)), ("attn_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("norm", (dim,)), ("freq_cis", (2, seq_len, head_dim // 2))]
    if not shared:
        shapes.append(("lm_head", (vocab, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != HEADER.size + 4 * n_floats:
        raise UserError(f"'{path}' holds {len(raw) - HEADER.size} bytes of weights but its header implies "
                        f"{4 * n_floats}; the file is truncated or not a legacy llama2.c checkpoint")
    flat = np.frombuffer(raw, dtype="<f4", offset=HEADER.size)
    arrays, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(flat[pos:pos + n].copy()).view(shape)
        pos += n

    cfg = ModelConfig(kind="transformer", d_model=dim, n_layers=n_layers, n_ctx=seq_len, vocab_size=vocab,
                      heads=n_heads, kv_heads=n_kv_heads, ffn_hidden=hidden, tie_embeddings=shared,
                      final_norm=True, norm_eps=1e-5, rope_theta=10000.0)
    sd = {"embed.weight": arrays["embed"], "norm.weight": arrays["norm"]}
    for i in range(n_layers):
        p = f"blocks.{i}."
        sd[p + "attn_norm.weight"] = arrays["attn_norm"][i]
        sd[p + "attn.wq.weight"] = interleaved_to_rotate_half(arrays["wq"][i], n_heads)
        sd[p + "attn.wk.weight"] = interleaved_to_rotate_half(arrays["wk"][i], n_kv_heads)
        sd[p + "attn.wv.weight"] = arrays["wv"][i]
        sd[p + "attn.wo.weight"] = arrays["wo"][i]
        sd[p + "ffn_norm.weight"] = arrays["ffn_norm"][i]
        for w in ("w1", "w2", "w3"):
            sd[p + f"ffn.{w}.weight"] = arrays[w][i]
    sd["lm_head.weight"] = arrays["embed"] if shared else arrays["lm_head"]
    return cfg, sd


@torch.no_grad()
def greedy(model, start: list[int], steps: int, stop_id: int | None) -> list[int]:
    ids = list(start)
    for _ in range(steps):
        if len(ids) >= model.config.n_ctx:
            break
        logits = model(torch.tensor([ids]))[0, -1]
        nxt = int(logits.argmax())
        if nxt == stop_id:
            break
        ids.append(nxt)
    return ids[len(start):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="llama2.c .bin checkpoint (legacy version 0)")
    ap.add_argument("--tokenizer", required=True, help="its sentencepiece .model (e.g. tok512.model)")
    ap.add_argument("--out", required=True, help="export directory to write (must not exist)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    ap.add_argument("--sample", action="store_true", help="print the greedy continuation from BOS")
    ap.add_argument("--steps", type=int, default=256, help="tokens to generate with --sample (default 256)")
    args = ap.parse_args(argv)
    try:
        ckpt, tok = Path(args.checkpoint), Path(args.tokenizer)
        if not ckpt.is_file():
            raise UserError(f"checkpoint '{ckpt}' does not exist; pass a llama2.c .bin file")
        if not tok.is_file():
            raise UserError(f"tokenizer '{tok}' does not exist; pass the checkpoint's sentencepiece .model")
        cfg, sd = read_llama2c(ckpt)
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(tok))
        except (RuntimeError, OSError):
            raise UserError(f"tokenizer '{tok}' is not a sentencepiece model; pass the checkpoint's .model file") from None
        if sp.vocab_size() != cfg.vocab_size:
            raise UserError(f"tokenizer '{tok}' has {sp.vocab_size()} pieces but the checkpoint's vocab is "
                            f"{cfg.vocab_size}; pass the tokenizer the checkpoint was trained with")
        model = build_model(cfg)
        model.load_state_dict(sd, strict=True)
        out = save_export(args.out, model.state_dict(), cfg, tok, overwrite=args.overwrite,
                          info={"source": f"llama2.c {ckpt.name}", "parameters": model.num_params(),
                                "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
                                "rope_layout": "rotate-half (wq/wk rows permuted from llama2.c's interleaved)"})
        print(f"wrote {out} ({model.num_params():,} parameters)", file=sys.stderr)
        if args.sample:
            model.eval()
            ids = greedy(model, [sp.bos_id()], args.steps, sp.eos_id())
            print(sp.decode(ids))
    except UserError as e:
        print(f"import_llama2c: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
