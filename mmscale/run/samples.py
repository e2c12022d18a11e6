"""Generated samples at chosen steps of a run (log.sample_every, log.sample_prompts): samples.jsonl in run.dir,
one {"step", "time", "prompt", "text", "tokens"} row per prompt, and a "samples" event in metrics.jsonl.

Every rank calls `Sampler.after_step` alike: generation runs the forward on every rank, because under FSDP
and ZeRO-3 each forward gathers parameters from all ranks; rank 0 samples each token and broadcasts it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mmscale.data.tokenizer import load_tokenizer
from mmscale.export.generate import sample_next


def find_tokenizer(cfg) -> Path | None:
    """The tokenizer.model shipped with the training data (or the export training started from)."""
    for root in (cfg.data.train, cfg.data.val, cfg.train.init_from):
        if root and "://" not in root:
            p = Path(root) / "tokenizer.model"
            if p.is_file():
                return p
    return None


@torch.no_grad()
def generate_batch(module, prompts: list[list[int]], n_ctx: int, new_tokens: int, temperature: float,
                   top_k: int, seed: int, eos_id: int, pad_id: int, device) -> list[list[int]]:
    """Continue every prompt in one fixed window of n_ctx positions, filled in place (causal models: the
    padding after position i cannot change the logits at i). All ranks call this with the same input; the
    token chosen on rank 0 is broadcast, so the ranks stay in step even if their logits differ by rounding."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank0 = not dist or torch.distributed.get_rank() == 0
    window = torch.full((len(prompts), n_ctx), max(pad_id, 0), dtype=torch.long)
    pos = []
    for i, p in enumerate(prompts):
        p = p[-(n_ctx - 1):]
        window[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        pos.append(len(p))
    pos_t = torch.tensor(pos)
    generator = torch.Generator().manual_seed(seed)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = min(new_tokens, n_ctx - min(pos))
    for _ in range(steps):
        logits = module(window.to(device))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        last = logits.float().cpu()[torch.arange(len(prompts)), (pos_t - 1).clamp(max=n_ctx - 1)]
        tok = sample_next(last, temperature, top_k, generator) if rank0 else torch.zeros(len(prompts),
                                                                                          dtype=torch.long)
        if dist:
            t = tok.to(device)
            torch.distributed.broadcast(t, src=0)
            tok = t.cpu()
        for i in range(len(prompts)):
            if done[i] or pos[i] >= n_ctx:
                done[i] = True
                continue
            window[i, pos[i]] = tok[i]
            new[i].append(int(tok[i]))
            pos[i] += 1
            if int(tok[i]) == eos_id:
                done[i] = True
        pos_t = torch.tensor(pos)
        if all(done):
            break
    return new


class Sampler:
    """Writes samples at every log.sample_every steps and at the last step; says once why it cannot."""

    def __init__(self, cfg, rank: int, engine, model, device, logger):
        self.cfg, self.rank, self.engine, self.device, self.logger = cfg, rank, engine, device, logger
        self.run_dir = Path(cfg.run.dir)
        self.bidirectional = bool(getattr(getattr(model, "config", None), "bidirectional", False))
        self.n_ctx = getattr(getattr(model, "config", None), "n_ctx", 0)
        self._sp = None
        self._sample_note_given = False

    def after_step(self, step: int, at_end: bool) -> None:
        every = self.cfg.log.sample_every
        if every and (step % every == 0 or at_end):
            self.write_samples(step)

    def _tokenizer(self):
        if self._sp is None:
            path = find_tokenizer(self.cfg)
            if path is None:
                return None
            self._sp = load_tokenizer(path)
        return self._sp

    def write_samples(self, step: int) -> None:
        sp = self._tokenizer()  # the same answer on every rank (shared data dir)
        why = None
        if sp is None:
            why = "no tokenizer.model next to data.train/data.val"
        elif self.bidirectional:
            why = "the model is bidirectional (model.bidirectional=true) and cannot generate"
        elif not self.n_ctx:
            why = "the model has no config.n_ctx"
        if why:
            if not self._sample_note_given:
                self.logger.write(f"log.sample_every: no samples: {why}")
                self._sample_note_given = True
            return
        lg = self.cfg.log
        eos = sp.eos_id()
        prompts = [([eos] if eos >= 0 else []) + sp.encode(p) for p in lg.sample_prompts]
        module = self.engine.module()
        was_training = module.training
        module.eval()
        t0 = time.perf_counter()
        try:
            # under the engine's autocast, as its training forward: FSDP2 in bf16 holds bf16 block weights
            # between its gathers, and fp32 activations would meet them in a matmul
            with self.engine.autocast():
                new = generate_batch(module, prompts, self.n_ctx, lg.sample_tokens, lg.sample_temperature, 40,
                                     self.cfg.run.seed + step, eos, sp.pad_id(), self.device)
        finally:
            module.train(was_training)
        if self.rank != 0:
            return
        now = round(time.time(), 3)
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for prompt, p_ids, ids in zip(lg.sample_prompts, prompts, new):
                # decoded with the prompt, then cut after it: the word boundary between them survives
                p_ids = [t for t in p_ids if t != eos]
                head = sp.decode(p_ids)
                full = sp.decode(p_ids + [t for t in ids if t != eos])
                text = full[len(head):] if full.startswith(head) else sp.decode([t for t in ids if t != eos])
                f.write(json.dumps({"step": step, "time": now, "prompt": prompt, "text": text,
                                    "tokens": len(ids)}) + "\n")
        self.logger.event(step, "samples", n=len(new), seconds=round(time.perf_counter() - t0, 3))
