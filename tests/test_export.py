"""Exports in use: the format, load_export_state (train.init_from), generate, eval and the Embedder.

Each result is compared with a reference computed another way: generation against a loop that
fills the future with random tokens instead of padding, eval against a float64 cross-entropy
summed by hand, the Embedder against one unpadded forward per text.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmscale.cli import main as cli_main
from mmscale.config import ModelConfig
from mmscale.errors import UserError
from mmscale.export.format import load_export, load_export_state, save_export
from mmscale.models import build_model
from tests._data_helpers import make_tiny_corpus

VOCAB = 512


def tiny_cfg(kind: str, **kw) -> ModelConfig:
    base = dict(kind=kind, d_model=32, n_layers=2, n_ctx=24, vocab_size=VOCAB, heads=2)
    return ModelConfig(**{**base, **kw})


def make_export(tmp_path, kind="mixer", name=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_cfg(kind, **kw)
    model = build_model(cfg)
    _, tok = make_tiny_corpus(stories=200, vocab_size=VOCAB)
    out = save_export(tmp_path / (name or kind), model.state_dict(), cfg, tok, info={"steps": 0})
    return out, model.eval()


def test_export_loads_with_torch_and_safetensors_only(tmp_path):
    out, model = make_export(tmp_path, "transformer", tie_embeddings=True)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    # a fresh interpreter that cannot import mmscale
    code = (
        "import json, sys; sys.modules['mmscale'] = None\n"
        "from safetensors.torch import load_file\n"
        f"sd = load_file({str(out / 'model.safetensors')!r})\n"
        f"cfg = json.load(open({str(out / 'config.json')!r}))\n"
        "print(json.dumps({'shapes': {k: list(v.shape) for k, v in sd.items()}, 'model': cfg['model']}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["shapes"] == expected
    assert got["model"]["kind"] == "transformer" and got["model"]["tie_embeddings"] is True
    assert (out / "tokenizer.model").is_file() and "transformer" in (out / "README.md").read_text()
    reloaded, _ = load_export(out)
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(reloaded(ids), model(ids), rtol=0, atol=0)
    assert reloaded.lm_head.weight is reloaded.embed.weight


def test_load_export_state_gives_same_weights_and_checks_shapes(tmp_path):
    out, model = make_export(tmp_path, "mixer")
    sd = load_export_state(out, tiny_cfg("mixer"))
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    # init_from into a fresh model: identical logits
    fresh = build_model(tiny_cfg("mixer"))
    fresh.load_state_dict(sd, strict=True)
    ids = torch.randint(0, VOCAB, (2, 24))
    assert torch.equal(fresh.eval()(ids), model(ids))
    with pytest.raises(UserError, match="model.d_model"):
        load_export_state(out, tiny_cfg("mixer", d_model=64))
    # a file whose tensors do not fit its own config: a clear shape error
    torch.manual_seed(1)
    other = build_model(tiny_cfg("mixer", n_ctx=16))
    bad = save_export(tmp_path / "bad", other.state_dict(), tiny_cfg("mixer"), None)
    with pytest.raises(UserError, match="shape"):
        load_export_state(bad, tiny_cfg("mixer"))


def reference_greedy(model, prompt, n_new, fill_random: bool):
    """Greedy continuation recomputed from scratch each step; the mixer's future is random tokens."""
    ids = list(prompt)
    g = torch.Generator().manual_seed(5)
    for _ in range(n_new):
        if fill_random:
            window = torch.randint(0, VOCAB, (1, model.config.n_ctx), generator=g)
            window[0, :len(ids)] = torch.tensor(ids)
            logits = model(window)[0, len(ids) - 1]
        else:
            logits = model(torch.tensor([ids[-model.config.n_ctx:]]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_generate_greedy_matches_reference(tmp_path, kind):
    from mmscale.export.generate import generate_ids

    _, model = make_export(tmp_path, kind)
    prompt = [3, 17, 42, 99]
    n_new = 30 if kind == "transformer" else 15  # the transformer slides past n_ctx = 24
    got = generate_ids(model, prompt, n_new, temperature=0)
    assert got == reference_greedy(model, prompt, n_new, fill_random=(kind == "mixer"))
    # top-k 1 sampling is greedy; a fixed seed reproduces a sample
    assert generate_ids(model, prompt, 10, temperature=1.0, top_k=1, seed=3) == got[:10]
    a = generate_ids(model, prompt, 10, temperature=1.0, seed=3)
    assert a == generate_ids(model, prompt, 10, temperature=1.0, seed=3)


def test_generate_mixer_stops_when_window_full_and_cli(tmp_path, capsys):
    from mmscale.export.generate import generate_ids

    out, model = make_export(tmp_path, "mixer")
    assert len(generate_ids(model, [3, 5], 100, temperature=0)) == 24 - 2
    with pytest.raises(UserError, match="window"):
        generate_ids(model, list(range(24)), 5)
    assert cli_main(["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                     "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_eval_matches_float64_reference(tmp_path):
    import sentencepiece as spm

    out, model = make_export(tmp_path, "mixer")
    text, tok = make_tiny_corpus(stories=200, vocab_size=VOCAB)
    docs = [d.strip("\n") for d in text.read_text().split("<|endoftext|>\n") if d.strip()][:12]
    data = tmp_path / "docs.txt"
    data.write_text("".join(d + "\n<|endoftext|>\n" for d in docs))
    result_file = tmp_path / "eval.json"
    assert cli_main(["eval", str(out), "--data", str(data), "--batch-size", "3", "--json", str(result_file)]) == 0
    got = json.loads(result_file.read_text())

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    stream = [t for d in docs for t in sp.encode(d) + [sp.eos_id()]]
    n_ctx = model.config.n_ctx
    m64 = build_model(model.config).double()
    m64.load_state_dict(model.state_dict())
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), n_ctx + 1):
            w = stream[start:start + n_ctx + 1]
            if len(w) < 2:
                continue
            logp = torch.log_softmax(m64(torch.tensor([w[:-1]]))[0], -1)
            nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            count += len(w) - 1
    assert got["tokens"] == count == len(stream) - (len(stream) + n_ctx) // (n_ctx + 1)
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)


def test_eval_on_prepared_dataset(tmp_path):
    from tests._data_helpers import make_tiny_dataset

    out, model = make_export(tmp_path, "transformer")
    data_dir = make_tiny_dataset(tmp_path, n_ctx=24, vocab_size=VOCAB, stories=200)
    res = tmp_path / "r.json"
    assert cli_main(["eval", str(out), "--data", str(data_dir), "--batch-size", "4", "--max-batches", "2",
                     "--json", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["tokens"] == 2 * 4 * 24
    assert 0 < got["loss"] < 2 * np.log(VOCAB)


def test_embedder_matches_unpadded_forward(tmp_path):
    import mmscale

    out, model = make_export(tmp_path, "mixer", final_norm=True)
    texts = ["Lily had a red ball.", "Tom and his dog went to the park to play in the sun.", "A cat.",
             "The duck found a shiny key under a big green tree near the pond."]
    emb = mmscale.Embedder.from_export(out)
    got = emb.encode(texts, batch_size=3)
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for i, t in enumerate(texts):
        ids = emb.tokenizer.encode(t)[:24]  # the Embedder keeps the first n_ctx tokens
        torch.set_grad_enabled(False)
        h = model.hidden(torch.tensor([ids]))[0, -1].double()
        np.testing.assert_allclose(got[i], (h / h.norm()).numpy(), atol=1e-5)
        h2 = model.hidden(torch.tensor([ids]))[0, -2].double()
        np.testing.assert_allclose(emb.encode([t], position=-2)[0], (h2 / h2.norm()).numpy(), atol=1e-5)
        torch.set_grad_enabled(True)
    # batch composition does not matter
    np.testing.assert_allclose(emb.encode(texts, batch_size=1), got, atol=1e-5)
    with pytest.raises(UserError, match="list of texts"):
        emb.encode("a single string")


def test_bad_exports_give_one_line_errors(tmp_path, capsys):
    out, _ = make_export(tmp_path, "mixer")
    no_tok = tmp_path / "no_tok"
    torch.manual_seed(0)
    save_export(no_tok, build_model(tiny_cfg("mixer")).state_dict(), tiny_cfg("mixer"), None)
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    (no_cfg / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cases = [(["generate", str(no_tok), "--prompt", "hi"], "tokenizer"),
             (["eval", str(no_cfg), "--data", "x.txt"], "config.json"),
             (["eval", str(out), "--data", str(tmp_path / "missing.txt")], "does not exist"),
             (["generate", str(tmp_path / "nowhere")], "not a directory")]
    for argv, needle in cases:
        assert cli_main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        save_export(out, {}, tiny_cfg("mixer"), None)
    assert (out / "model.safetensors").read_bytes() == before
