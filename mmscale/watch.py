"""What the training loop reports besides its losses: MFU against the device's peak, generated samples at
chosen steps, a torch.profiler trace (and a CUDA memory snapshot), and event markers for `mmscale report`.

train.py makes one `RunWatch` after the metrics logger and calls it at four points:
    watch.mfu(tokens_per_s)          -> the MFU columns of a training row
    watch.after_step(step, at_end)   -> samples (log.sample_every) and the profiler window (log.profile_steps)
    logger.event(step, "checkpoint") -> (the logger itself)
    watch.close()                    -> stops a profiler still recording
Every rank calls these alike: generation runs the forward on every rank, because under FSDP and ZeRO-3
each forward gathers parameters from all ranks; rank 0 samples each token and broadcasts it.

Files in run.dir: samples.jsonl ({"step", "time", "prompt", "text", "tokens"} per prompt),
profile/steps_A-B/rankR.pt.trace.json (Chrome trace; `tensorboard --logdir run.dir/profile` with the
torch-tb-profiler plugin reads the same files) and, on CUDA, profile/steps_A-B/rankR.memory.pickle.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mmscale.metrics import flops_per_token_both, mfu_columns
from mmscale.peak_flops import device_peak
from mmscale.precision import recorded as precision_record


def find_tokenizer(cfg) -> Path | None:
    """The tokenizer.model shipped with the training data (or the export training started from)."""
    for root in (cfg.data.train, cfg.data.val, cfg.train.init_from):
        if root and "://" not in root:
            p = Path(root) / "tokenizer.model"
            if p.is_file():
                return p
    return None


def trim_jsonl(path: Path, upto_step: int) -> None:
    """Drop rows after `upto_step` (a resumed run writes them again); tolerates a torn last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto_step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    tmp = path.with_name(".tmp_" + path.name)
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


@torch.no_grad()
def generate_batch(module, prompts: list[list[int]], n_ctx: int, new_tokens: int, temperature: float,
                   top_k: int, seed: int, eos_id: int, pad_id: int, device) -> list[list[int]]:
    """Continue every prompt in one fixed window of n_ctx positions, filled in place (causal models: the
    padding after position i cannot change the logits at i). All ranks call this with the same input; the
    token chosen on rank 0 is broadcast, so the ranks stay in step even if their logits differ by rounding."""
    from mmscale.export.generate import sample_next

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


class RunWatch:
    def __init__(self, cfg, info, engine, model, device, logger, start_step: int, resume_dir):
        self.cfg, self.info, self.engine, self.device, self.logger = cfg, info, engine, device, logger
        self.run_dir = Path(cfg.run.dir)
        self.flops = flops_per_token_both(model)
        self.peak, self.peak_note = device_peak(device, cfg.engine.precision, cfg.log.peak_flops)
        self.model_kind = getattr(getattr(model, "config", None), "kind", "")
        self.bidirectional = bool(getattr(getattr(model, "config", None), "bidirectional", False))
        self.n_ctx = getattr(getattr(model, "config", None), "n_ctx", 0)
        self.profiler = None
        self.memory_history = False
        self.profile_range = None
        self._sp = None
        self._sample_note_given = False
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if info.rank == 0:
            trim_jsonl(self.run_dir / "samples.jsonl", start_step)
            logger.event(start_step, "resume" if resume_dir is not None else "start",
                         device=name, world_size=info.world_size, engine=cfg.engine.kind,
                         precision=cfg.engine.precision, **precision_record(cfg.engine.precision),
                         peak_flops=self.peak, peak_source=self.peak_note,
                         flops_per_token_dense=self.flops["dense"], flops_per_token_causal=self.flops["causal"],
                         **({"from": str(resume_dir)} if resume_dir is not None else {}))
            if precision_record(cfg.engine.precision):
                logger.write(precision_record(cfg.engine.precision)["precision_reason"])
            if self.peak is None:
                logger.write(f"MFU: {self.peak_note}")
        ps = cfg.log.profile_steps
        if ps:
            self.profile_range = (ps[0], ps[0] + ps[1] - 1)
            self._maybe_start_profiler(start_step + 1)

    # --- MFU
    def mfu(self, tokens_per_s: float) -> dict:
        return mfu_columns(tokens_per_s, self.flops, self.peak, self.info.world_size)

    # --- once per step, on every rank
    def after_step(self, step: int, at_end: bool) -> None:
        every = self.cfg.log.sample_every
        if every and (step % every == 0 or at_end):
            self.write_samples(step)
        if self.profiler is not None and step >= self.profile_range[1]:
            self._stop_profiler()
        if not at_end:
            self._maybe_start_profiler(step + 1)

    # --- samples
    def _tokenizer(self):
        if self._sp is None:
            path = find_tokenizer(self.cfg)
            if path is None:
                return None
            from mmscale.data.tokenizer import load_tokenizer
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
        if self.info.rank != 0:
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

    # --- profiler
    def _maybe_start_profiler(self, upcoming: int) -> None:
        if (self.profile_range is None or self.profiler is not None or upcoming != self.profile_range[0]
                or self.info.rank not in self.cfg.log.profile_ranks):
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=acts, record_shapes=True, profile_memory=True)
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.memory_history = True
        self.profiler.start()

    def _stop_profiler(self) -> None:
        prof, self.profiler = self.profiler, None
        prof.stop()
        a, b = self.profile_range
        out = self.run_dir / "profile" / f"steps_{a}-{b}"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"rank{self.info.rank}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        files = {"trace": str(trace)}
        if self.memory_history:
            snap = out / f"rank{self.info.rank}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_history = False
            files["memory_snapshot"] = str(snap)
        self.logger.write(f"profiler: steps {a}-{b} -> {trace}")
        self.logger.event(b, "profile", first=a, last=b, **files)  # rank 0's logger only writes

    def close(self) -> None:
        if self.profiler is not None:
            self._stop_profiler()
