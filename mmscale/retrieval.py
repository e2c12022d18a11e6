"""Retrieval fine-tuning (InfoNCE) and top-1 evaluation: `mmscale retrieval train|eval`.

    mmscale retrieval train --init exports/mixer --pairs pairs.jsonl --config configs/tiny.yaml run.dir=runs/ret
    torchrun --standalone --nproc_per_node 2 -m mmscale.cli retrieval train --init ... engine.kind=fsdp
    mmscale convert runs/ret exports/mixer-retrieval
    mmscale retrieval eval exports/mixer-retrieval --pairs test.jsonl --candidates 32,128

The paper's method (Badger 2024, v2+): the generative model without its LM head embeds a text by
its hidden state at one token (mmscale.embedder); training uses InfoNCE on cosine similarity with
temperature tau: each example is a group of 1 query, its passage and group_size - 2 negatives
(the pair's own "negatives" first, then other passages drawn with a seed). With
retrieval.gather_negatives every query also scores the candidates of all other groups on all
ranks (gathered without gradient; each rank's own candidates keep theirs).

Training is the pre-training loop (mmscale.train.train) with a retrieval model and data factory,
so every engine, checkpoints, resume, signals and metrics work unchanged: the model's `forward`
is replaced on the instance by the InfoNCE loss (parameter names, hence checkpoints and
`mmscale convert`, are those of the language model), and a batch is {"input_ids": Long[B*G, n_ctx]
(right-padded groups), "labels": Long[B*G] (the number of real tokens of each sequence)}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mmscale.errors import UserError


# ---------------------------------------------------------------------------------------------
# pairs

def read_pairs(path: str | os.PathLike) -> list[dict]:
    """JSONL rows {"query": str, "passage": str, optional "negatives": [str, ...]}; UserError per bad line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pairs file '{path}' does not exist; pass a JSONL file of {{\"query\", \"passage\"}} rows "
                        "(`mmscale data synth` writes one)")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON; each line must be one object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n} is not a JSON object; give {{\"query\": ..., \"passage\": ...}}")
            for field in ("query", "passage"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise UserError(f"{path}:{n} has no non-empty string field \"{field}\"; every line needs "
                                    "\"query\" and \"passage\"")
            negs = row.get("negatives", [])
            if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
                raise UserError(f"{path}:{n}: \"negatives\" must be a list of strings")
            rows.append({"query": row["query"], "passage": row["passage"], "negatives": negs})
    if len(rows) < 2:
        raise UserError(f"pairs file '{path}' holds {len(rows)} pair(s); retrieval needs at least 2")
    return rows


class PairGroups:
    """Endless groups of token sequences for InfoNCE, with the data-loader contract of the trainer.

    The global stream of pairs is a seeded permutation per epoch; global batch k holds stream
    positions [k W B, (k + 1) W B) and rank r its slice [k W B + r B, k W B + (r + 1) B), so the
    samples depend only on the global batch size (resume onto another world size continues it).
    The random negatives of stream position t depend only on (seed, t).
    """

    def __init__(self, queries, passages, negatives, *, group_size: int, micro_batch: int, n_ctx: int,
                 seed: int, rank: int = 0, world: int = 1, pad_id: int = 0):
        if len(passages) < group_size - 1 and group_size > 2:
            raise UserError(f"retrieval.group_size is {group_size} but the pairs file holds only {len(passages)} "
                            f"passages; set retrieval.group_size <= {len(passages) + 1} or add pairs")
        self.q, self.p, self.negs = queries, passages, negatives
        self.G, self.B, self.n_ctx, self.seed = group_size, micro_batch, n_ctx, seed
        self.rank, self.world, self.pad = rank, world, max(pad_id, 0)
        self.batches = 0
        self._perm_epoch, self._perm = -1, None

    def _pair_at(self, t: int) -> int:
        import torch

        n = len(self.q)
        epoch = t // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self._perm[t % n]

    def group(self, t: int) -> list[list[int]]:
        """[query, passage, negatives...] token lists of stream position t."""
        import torch

        i = self._pair_at(t)
        seqs = [self.q[i], self.p[i]] + self.negs[i][:self.G - 2]
        need = self.G - len(seqs)
        if need > 0:
            g = torch.Generator().manual_seed(self.seed * 7_919 + t)
            others = torch.randperm(len(self.p) - 1, generator=g)[:need].tolist()
            seqs += [self.p[j + (j >= i)] for j in others]  # every passage but the pair's own
        return seqs

    def batch_at(self, k: int) -> dict:
        import torch

        from mmscale.embedder import pad_batch

        start = (k * self.world + self.rank) * self.B
        seqs = [s for t in range(start, start + self.B) for s in self.group(t)]
        ids, lengths = pad_batch(seqs, self.pad)
        full = torch.full((len(seqs), self.n_ctx), self.pad, dtype=torch.long)
        full[:, :ids.shape[1]] = ids  # a fixed width: the same shapes every step (compile-friendly)
        return {"input_ids": full, "labels": lengths}

    def __iter__(self):
        while True:
            batch = self.batch_at(self.batches)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "world": self.world, "micro_batch": self.B}

    def load_state_dict(self, state: dict) -> None:
        # the same global batch on another world size: scale the batch count
        self.batches = state["batches"] * state["world"] * state.get("micro_batch", self.B) // (self.world * self.B)


# ---------------------------------------------------------------------------------------------
# the loss

def info_nce(emb, group_size: int, temperature: float, gather: bool = False):
    """Mean InfoNCE loss of normalised embeddings [B*G, d] laid out as groups [query, positive, negatives].

    Without `gather` each query scores its own group's G - 1 candidates; with it, the candidates of
    every group on every rank (other ranks' embeddings without gradient).
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    d = emb.shape[-1]
    groups = emb.view(-1, group_size, d)
    B = groups.shape[0]
    queries, cands = groups[:, 0], groups[:, 1:]
    if not gather:
        logits = torch.einsum("bd,bkd->bk", queries, cands) / temperature
        target = torch.zeros(B, dtype=torch.long, device=emb.device)
    else:
        flat = cands.reshape(-1, d)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if world > 1:
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat.detach().contiguous())
            parts[rank] = flat  # this rank's candidates keep their gradient
            flat = torch.cat(parts)
        logits = queries @ flat.T / temperature
        target = (rank * B + torch.arange(B, device=emb.device)) * (group_size - 1)
    return F.cross_entropy(logits.float(), target)


def install_retrieval_loss(model, rcfg) -> None:
    """Replace `model.forward` (on the instance) by the InfoNCE loss; see the module docstring."""
    from mmscale.embedder import parse_position, pooled_embeddings

    position = parse_position(rcfg.position)
    lm_forward = model.forward

    def forward(input_ids, labels=None):
        if labels is None or labels.dim() != 1:
            return lm_forward(input_ids, labels)
        emb = pooled_embeddings(model, input_ids, labels, position)
        return info_nce(emb, rcfg.group_size, rcfg.temperature, rcfg.gather_negatives)

    model.forward = forward


# ---------------------------------------------------------------------------------------------
# training

def _tokenizer_of(export: str):
    from mmscale.data.tokenizer import load_tokenizer
    from mmscale.export.format import load_export_config

    meta = load_export_config(export)
    tok = Path(export) / (meta.get("tokenizer") or "tokenizer.model")
    if not tok.is_file():
        raise UserError(f"export '{export}' has no tokenizer.model; re-run `mmscale convert` with --tokenizer")
    return load_tokenizer(tok)


def retrieval_model_factory(cfg):
    from mmscale.export.format import load_export_state
    from mmscale.models import build_model

    model = build_model(cfg.model)
    model.load_state_dict(load_export_state(cfg.train.init_from, cfg.model), strict=True)
    if not cfg.model.tie_embeddings:
        # the head is not part of the embedder: frozen, it stays the pre-trained one in the export
        model.lm_head.weight.requires_grad_(False)
    install_retrieval_loss(model, cfg.retrieval)
    return model


def retrieval_data_factory(cfg, info, micro_batch_size: int):
    from mmscale.embedder import encode_texts

    sp = _tokenizer_of(cfg.train.init_from)
    pairs = read_pairs(cfg.retrieval.pairs)
    n_ctx = cfg.model.n_ctx
    queries = encode_texts(sp, [r["query"] for r in pairs], n_ctx)
    passages = encode_texts(sp, [r["passage"] for r in pairs], n_ctx)
    flat_negs = encode_texts(sp, [x for r in pairs for x in r["negatives"]], n_ctx) if any(
        r["negatives"] for r in pairs) else []
    negatives, at = [], 0
    for r in pairs:
        negatives.append(flat_negs[at:at + len(r["negatives"])])
        at += len(r["negatives"])
    loader = PairGroups(queries, passages, negatives, group_size=cfg.retrieval.group_size,
                        micro_batch=micro_batch_size, n_ctx=n_ctx, seed=cfg.run.seed, rank=info.rank,
                        world=info.world_size, pad_id=sp.pad_id())
    return loader, None


def prepare_config(cfg, init: str | None, pairs: str | None):
    """Fill train.init_from / retrieval.pairs and take the model config from the export."""
    from mmscale.config import ModelConfig, _build
    from mmscale.export.format import load_export_config

    if init:
        cfg.train.init_from = init
    if pairs:
        cfg.retrieval.pairs = pairs
    if not cfg.train.init_from:
        raise UserError("retrieval training starts from an export: pass --init EXPORT (or train.init_from=EXPORT)")
    if not cfg.retrieval.pairs:
        raise UserError("no pairs: pass --pairs PAIRS.jsonl (or retrieval.pairs=PATH)")
    meta = load_export_config(cfg.train.init_from)
    cfg.model = _build(ModelConfig, meta["model"], "model")
    read_pairs(cfg.retrieval.pairs)  # bad pairs fail before any process group starts
    return cfg


def train_retrieval(cfg) -> int:
    from mmscale.train import train

    return train(cfg, model_factory=retrieval_model_factory, data_factory=retrieval_data_factory)


# ---------------------------------------------------------------------------------------------
# evaluation

def top1_table(query_emb, passage_emb, candidates: list[int], seed: int = 0, chunk: int = 64) -> list[dict]:
    """Top-1 accuracy and MRR of each query's own passage among n candidates, for each n.

    Candidates: the true passage plus n - 1 distractors drawn without replacement from the other
    passages with a seed fixed per (seed, n). Ties count against the true passage.
    """
    import numpy as np

    q, p = np.asarray(query_emb, dtype=np.float32), np.asarray(passage_emb, dtype=np.float32)
    N = len(q)
    rows = []
    for n in candidates:
        if n < 2 or n > N:
            raise UserError(f"--candidates {n}: needs 2 <= n <= {N}, the number of held-out passages; "
                            f"pass smaller values or more pairs")
        rng = np.random.default_rng([seed, n])
        ranks = np.empty(N, dtype=np.int64)
        for start in range(0, N, chunk):
            idx = np.arange(start, min(start + chunk, N))
            distract = np.stack([rng.choice(N - 1, n - 1, replace=False) for _ in idx])
            distract += distract >= idx[:, None]          # skip the query's own passage
            true_score = np.einsum("bd,bd->b", q[idx], p[idx])
            scores = np.einsum("bd,bkd->bk", q[idx], p[distract])
            ranks[idx] = 1 + (scores >= true_score[:, None]).sum(1)
        rows.append({"candidates": n, "top1": float((ranks == 1).mean()), "mrr": float((1.0 / ranks).mean()),
                     "queries": N})
    return rows


def evaluate_export(export: str, pairs_path: str, candidates: list[int], *, seed: int = 0, batch_size: int = 32,
                    position: str = "last", progress: bool = True) -> dict:
    from mmscale.embedder import Embedder

    pairs = read_pairs(pairs_path)
    if max(candidates) > len(pairs):
        raise UserError(f"--candidates {max(candidates)} is more than the {len(pairs)} held-out passages in "
                        f"'{pairs_path}'; pass at most {len(pairs)} or more pairs")
    emb = Embedder.from_export(export, position=position)
    # embeddings computed once, reused for every n
    q = emb.encode([r["query"] for r in pairs], batch_size=batch_size, progress=progress)
    p = emb.encode([r["passage"] for r in pairs], batch_size=batch_size, progress=progress)
    return {"export": str(export), "pairs": str(pairs_path), "n_pairs": len(pairs), "seed": seed,
            "position": position, "results": top1_table(q, p, candidates, seed)}


# ---------------------------------------------------------------------------------------------
# `mmscale retrieval`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="InfoNCE fine-tuning of an export (any engine)")
    t.add_argument("--init", help="the export to start from (sets train.init_from)")
    t.add_argument("--pairs", help="JSONL of {\"query\", \"passage\"[, \"negatives\"]} (sets retrieval.pairs)")
    t.add_argument("--config", default=None, help="YAML config (model.* comes from the export)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. retrieval.group_size=32 engine.kind=fsdp")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("eval", help="top-1 accuracy and MRR among n candidates")
    e.add_argument("export")
    e.add_argument("--pairs", required=True, help="held-out pairs (JSONL)")
    e.add_argument("--candidates", default="32", help="comma-separated n, e.g. 32,64,128 (default 32)")
    e.add_argument("--seed", type=int, default=0, help="seed of the distractor sampling")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--position", default="last", help="embedding token: last or an index such as -2")
    e.add_argument("--json", default="retrieval_eval.json", help="where to write the results (default ./retrieval_eval.json)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        from mmscale.config import load_config

        cfg = prepare_config(load_config(args.config, args.overrides), args.init, args.pairs)
        status = train_retrieval(cfg)
        if cfg.engine.kind == "deepspeed":  # see mmscale.train.run: leave without interpreter teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status
    try:
        candidates = sorted({int(x) for x in args.candidates.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--candidates must be comma-separated integers such as 32,64,128, got {args.candidates!r}") from None
    if not candidates:
        raise UserError("--candidates is empty; pass e.g. 32,64,128")
    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite or another --json path")
    result = evaluate_export(args.export, args.pairs, candidates, seed=args.seed, batch_size=args.batch_size,
                             position=args.position)
    print(f"{'candidates':>10}  {'top-1':>7}  {'MRR':>7}   ({result['n_pairs']} held-out pairs, seed {args.seed})")
    for r in result["results"]:
        print(f"{r['candidates']:>10}  {r['top1']:>7.4f}  {r['mrr']:>7.4f}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return 0
