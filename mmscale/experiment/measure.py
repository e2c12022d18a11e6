"""What is read off a run dir (its state, last val loss, throughput) and the measures of a finished main run:
held-out loss on the same fixed tokens for every arm, the other source's loss, the input-representation error
before and after training, retrieval after a short fine-tuning; each stored in RUN/eval.json once done."""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import torch

from mmscale.run import checkpoint as ckpt
from mmscale.config import config_from_dict, load_config
from mmscale.data.loader import read_manifest
from mmscale.errors import UserError
from mmscale.experiment.plan import Experiment, Run
from mmscale.experiment.spec import Spec, override_list
from mmscale.export.convert import convert
from mmscale.export.evaluate import dataset_batches, evaluate_loss
from mmscale.export.format import load_export
from mmscale.fsutil import atomic_write
from mmscale.models import build_model
from mmscale.representation import representation_error
from mmscale.retrieval.evaluate import evaluate_export
from mmscale.retrieval.train import prepare_config, train_retrieval
from mmscale.run.metrics import read_jsonl


def run_state(run_dir: Path, steps: int) -> tuple[str, int]:
    """('finished' | 'partial' | 'new', last checkpointed step)."""
    root = run_dir / "checkpoints"
    last = ckpt.find_latest(root) if root.is_dir() else None
    step = 0
    if last is not None:
        try:
            step = int(ckpt.read_meta(last).get("step", 0))
        except Exception:
            step = 0
    if step >= steps > 0:
        return "finished", step
    if step > 0 or (run_dir / "metrics.jsonl").exists():
        return "partial", step
    return "new", 0


def last_val_loss(run_dir: Path) -> float | None:
    vals = {int(r["step"]): r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl")[0]
            if "val_loss" in r and r["val_loss"] is not None}
    return vals[max(vals)] if vals else None


def median_throughput(run_dir: Path) -> float | None:
    tps = [r["tokens_per_s"] for r in read_jsonl(run_dir / "metrics.jsonl")[0]
           if "tokens_per_s" in r and r.get("tokens_per_s") and not r.get("skipped")]
    tps = tps[len(tps) // 10:] if len(tps) >= 10 else tps
    return statistics.median(tps) if tps else None


def write_json(path: Path, data) -> None:
    """`data` as indented JSON, written to a temporary sibling and renamed over `path` (never half-written)."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def fixed_batches(dataset: str, n_ctx: int, batch_size: int, batches: int):
    """The first `batches` batches of the val split (train when there is none), unshuffled: the same tokens for
    every arm and seed."""
    m = read_manifest(dataset)
    split = "val" if m.get("splits", {}).get("val", {}).get("samples", 0) > 0 else "train"
    return list(dataset_batches(dataset, n_ctx, batch_size, split, batches)), split


def measure_key(spec: Spec, name: str) -> str:
    """A short hash of what one measure depends on besides the trained model (its spec section)."""
    sec = dict(getattr(spec, name))
    if name == "retrieval":
        sec["data"] = [spec.data.get("retrieval"), spec.data.get("retrieval_test_fraction"),
                       spec.data.get("synth_stories")]
    return hashlib.sha256(json.dumps(sec, sort_keys=True, default=str).encode()).hexdigest()[:8]


def measured(exp: Experiment, run: Run) -> bool:
    """eval.json holds every measure, made with the spec's current measure sections."""
    path = run.dir(exp.exp) / "eval.json"
    if not path.is_file():
        return False
    ev = json.loads(path.read_text())
    spec = exp.spec
    return bool(ev.get("done")
                and (not spec.retrieval["enabled"] or ev.get("retrieval_key") == measure_key(spec, "retrieval"))
                and (not spec.representation["enabled"]
                     or ev.get("representation_key") == measure_key(spec, "representation")))


def evaluate_run(exp: Experiment, run: Run, progress: bool = False) -> dict:
    """The measures of one finished main run, each stored in run_dir/eval.json once done (resumable)."""
    spec, rd = exp.spec, run.dir(exp.exp)
    path = rd / "eval.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    export = rd / "export"
    if not (export / "model.safetensors").is_file():
        convert(rd, export, overwrite=export.exists(), progress=False)
    model, meta = load_export(export)
    n_ctx = model.config.n_ctx
    nc = run.overrides.get("model.n_ctx")
    ev = spec.eval
    if "heldout" not in out:
        batches, split = fixed_batches(exp.data["train"][nc], n_ctx, ev["batch_size"], ev["batches"])
        out["heldout"] = {**evaluate_loss(model, batches, progress=False), "split": split,
                          "dataset": exp.data["train"][nc]}
        write_json(path, out)
    if exp.data["other"].get(nc) and "other" not in out:
        batches, split = fixed_batches(exp.data["other"][nc], n_ctx, ev["batch_size"], ev["batches"])
        out["other"] = {**evaluate_loss(model, batches, progress=False), "split": split,
                        "dataset": exp.data["other"][nc]}
        write_json(path, out)
    rkey = measure_key(spec, "representation")
    if spec.representation["enabled"] and ("representation" not in out or out.get("representation_key") != rkey):
        r = spec.representation
        batches, _ = fixed_batches(exp.data["train"][nc], n_ctx, r["samples"], 1)
        ids = batches[0]["input_ids"][:r["samples"]]
        cfg = config_from_dict({}, override_list(run.overrides))
        torch.manual_seed(run.seed)  # the run's own initial weights
        init = build_model(cfg.model)
        before = representation_error(init, ids, steps=r["steps"], seed=run.seed)
        after = representation_error(model, ids, steps=r["steps"], seed=run.seed)
        out["representation"] = {"before": before, "after": after}
        out["representation_key"] = rkey
        write_json(path, out)
    del model
    key = measure_key(spec, "retrieval")
    if spec.retrieval["enabled"] and ("retrieval" not in out or out.get("retrieval_key") != key):
        out["retrieval"] = retrieval_measure(exp, run, export)
        out["retrieval_key"] = key
        write_json(path, out)
    out["done"] = True
    write_json(path, out)
    return out


def retrieval_measure(exp: Experiment, run: Run, export: Path) -> dict:
    r, rd = exp.spec.retrieval, run.dir(exp.exp)
    coll = exp.data["retrieval"]
    ret_dir = rd / f"retrieval-{measure_key(exp.spec, 'retrieval')}"  # a changed retrieval spec: a new run
    cfg = load_config(None, [f"run.dir={ret_dir}", f"run.seed={run.seed}", f"train.max_steps={r['steps']}",
                             f"train.lr={r['lr']}", f"train.warmup_steps={min(r['warmup_steps'], r['steps'] - 1)}",
                             f"train.micro_batch_size={r['micro_batch_size']}", "train.eval_every=0",
                             "checkpoint.every=0", f"retrieval.group_size={r['group_size']}",
                             f"retrieval.temperature={r['temperature']}", "log.progress=false",
                             f"retrieval.position={r['position']}", f"retrieval.gather_negatives={r['gather_negatives']}",
                             f"retrieval.passage_mode={r['passage_mode']}",
                             "log.wandb=disabled",
                             *[f"{k}={v}" for k, v in run.overrides.items() if k.startswith("engine.")]])
    cfg = prepare_config(cfg, str(export), r["pairs"] or None, coll,
                         "train" if (Path(coll) / "qrels" / "train.tsv").is_file() else None, r["negatives"])
    if run_state(ret_dir, r["steps"])[0] != "finished":
        status = train_retrieval(cfg)
        if status != 0:
            raise UserError(f"retrieval fine-tuning of {run.name} stopped with exit status {status}; rerun with "
                            "--resume")
    ret_export = ret_dir / "export"
    if not (ret_export / "model.safetensors").is_file():
        convert(ret_dir, ret_export, overwrite=ret_export.exists(), progress=False)
    res = evaluate_export(str(ret_export), coll, r["candidates"], seed=0, progress=False, position=r["position"],
                          passage_mode=r["passage_mode"], cache_dir=ret_dir / "retrieval_cache", device="auto")
    return {k: res.get(k) for k in ("n_queries", "n_corpus", "split", "metrics", "results", "baseline", "truncated",
                                    "hybrid", "paired_ndcg@10")}
