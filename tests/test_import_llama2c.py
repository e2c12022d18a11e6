"""tools/import_llama2c.py: a synthetic checkpoint against a run.c-style numpy forward, and the real stories260K."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "import_llama2c.py"
STORIES = REPO.parent / "shared" / "data" / "reference" / "stories260K"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EXPECTED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


pytestmark = pytest.mark.usefixtures("one_thread")


def load_tool():
    spec = importlib.util.spec_from_file_location("import_llama2c", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_llama2c(path: Path, dim=16, hidden=40, layers=2, heads=4, kv_heads=2, vocab=29, seq=10, shared=False,
                  seed=0) -> dict:
    """A random legacy llama2.c checkpoint; returns its arrays for the reference forward."""
    rng = np.random.default_rng(seed)
    hs = dim // heads
    kv_dim = kv_heads * hs
    w = {"emb": rng.normal(size=(vocab, dim)), "rms_att": rng.uniform(0.5, 1.5, (layers, dim)),
         "wq": rng.normal(size=(layers, dim, dim)) * 0.3, "wk": rng.normal(size=(layers, kv_dim, dim)) * 0.3,
         "wv": rng.normal(size=(layers, kv_dim, dim)) * 0.3, "wo": rng.normal(size=(layers, dim, dim)) * 0.3,
         "rms_ffn": rng.uniform(0.5, 1.5, (layers, dim)), "w1": rng.normal(size=(layers, hidden, dim)) * 0.3,
         "w2": rng.normal(size=(layers, dim, hidden)) * 0.3, "w3": rng.normal(size=(layers, hidden, dim)) * 0.3,
         "rms_final": rng.uniform(0.5, 1.5, dim), "freq": rng.normal(size=(2, seq, hs // 2))}
    w["wcls"] = w["emb"] if shared else rng.normal(size=(vocab, dim))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    header = np.array([dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq], dtype="<i4")
    order = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "freq"]
    order += [] if shared else ["wcls"]
    path.write_bytes(header.tobytes() + b"".join(w[k].astype("<f4").tobytes() for k in order))
    return dict(w, dim=dim, layers=layers, heads=heads, kv_heads=kv_heads, hs=hs)


def runc_forward(w: dict, tokens: list[int]) -> np.ndarray:
    """llama2.c run.c's forward, one position at a time with a KV cache, in float64."""
    def rmsnorm(x, g):
        return g * x / np.sqrt(np.mean(x * x) + 1e-5)

    hs, kv_mul = w["hs"], w["heads"] // w["kv_heads"]
    kv_dim = w["kv_heads"] * hs
    f = {k: v.astype(np.float64) for k, v in w.items() if isinstance(v, np.ndarray)}
    k_cache = np.zeros((w["layers"], len(tokens), kv_dim))
    v_cache = np.zeros((w["layers"], len(tokens), kv_dim))
    out = []
    for pos, tok in enumerate(tokens):
        x = f["emb"][tok].copy()
        for layer in range(w["layers"]):
            xb = rmsnorm(x, f["rms_att"][layer])
            q, k, v = f["wq"][layer] @ xb, f["wk"][layer] @ xb, f["wv"][layer] @ xb
            for i in range(0, w["dim"], 2):  # RoPE on adjacent pairs, as run.c
                val = pos / 10000.0 ** ((i % hs) / hs)
                c, s = np.cos(val), np.sin(val)
                for vec in ([q, k] if i < kv_dim else [q]):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
            k_cache[layer, pos], v_cache[layer, pos] = k, v
            att_out = np.zeros(w["dim"])
            for h in range(w["heads"]):
                kv = (h // kv_mul) * hs
                scores = k_cache[layer, :pos + 1, kv:kv + hs] @ q[h * hs:(h + 1) * hs] / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hs:(h + 1) * hs] = p @ v_cache[layer, :pos + 1, kv:kv + hs]
            x = x + f["wo"][layer] @ att_out
            xb = rmsnorm(x, f["rms_ffn"][layer])
            h1, h3 = f["w1"][layer] @ xb, f["w3"][layer] @ xb
            x = x + f["w2"][layer] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(f["wcls"] @ rmsnorm(x, f["rms_final"]))
    return np.stack(out)


@pytest.mark.parametrize("shared", [False, True])
def test_imported_model_computes_llama2c_forward(tmp_path, shared):
    from mmscale.models import build_model

    tool = load_tool()
    ckpt = tmp_path / "model.bin"
    w = write_llama2c(ckpt, shared=shared, seed=int(shared))
    cfg, sd = tool.read_llama2c(ckpt)
    assert (cfg.d_model, cfg.n_layers, cfg.heads, cfg.kv_heads, cfg.ffn_hidden, cfg.vocab_size, cfg.n_ctx) == \
        (16, 2, 4, 2, 40, 29, 10)
    assert cfg.tie_embeddings is shared
    model = build_model(cfg).eval()
    model.load_state_dict(sd, strict=True)
    tokens = np.random.default_rng(5).integers(0, 29, 10).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].double().numpy()
    np.testing.assert_allclose(logits, runc_forward(w, tokens), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path):
    ckpt = tmp_path / "model.bin"
    write_llama2c(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-4])
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not a sentencepiece model")  # the checkpoint is read first
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, str(TOOL), str(ckpt), "--tokenizer", str(tok), "--out", str(out)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1
    assert "error:" in r.stderr and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    write_llama2c(ckpt)  # now a good checkpoint with a bad tokenizer
    r = subprocess.run([sys.executable, str(TOOL), str(ckpt), "--tokenizer", str(tok), "--out", str(out)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1 and "not a sentencepiece model" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.shared_data
@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                    reason=f"{STORIES} is absent: the real llama2.c checkpoint exists only where ../shared/data does")
def test_stories260k_greedy_sample_is_llama2c_text(tmp_path):
    out = tmp_path / "stories260K"
    cmd = [sys.executable, str(TOOL), str(STORIES / "stories260K.bin"), "--tokenizer", str(STORIES / "tok512.model"),
           "--out", str(out), "--sample", "--steps", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(EXPECTED), r.stdout
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["kind"] == "transformer" and meta["model"]["kv_heads"] == 4
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model"}

    # the export reloads through the common reader and refuses to be overwritten
    from mmscale.export import load_export
    model, _ = load_export(out)
    assert model.num_params() == 260_032
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 1 and "already exists" in r.stderr
