"""The input-representation metric: untrained mixers keep their input, untrained transformers do not."""
from __future__ import annotations

import json

import pytest
import torch

from mmscale.cli import main as cli_main
from mmscale.config import ModelConfig
from mmscale.errors import UserError
from mmscale.models import build_model
from mmscale.representation import recover_tokens, representation_error


def test_recover_tokens_matches_least_squares():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(300, 24, generator=g)
    z = torch.randn(2, 5, 24, generator=g)
    got = recover_tokens(z, E, top_k=5)
    # the minimum-norm solution c of c @ E = z, by lstsq on E^T (float64)
    coeffs = torch.linalg.lstsq(E.double().T, z.double().reshape(-1, 24).T, driver="gelsd").solution.T
    ref = coeffs.reshape(2, 5, 300).topk(5, dim=-1).indices
    assert torch.equal(got, ref)
    # exact embeddings come back as their own tokens
    ids = torch.randint(0, 300, (3, 7), generator=g)
    assert torch.equal(recover_tokens(E[ids], E, top_k=1)[..., 0], ids)


def _untrained(kind):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, d_model=256, n_layers=2, n_ctx=16, vocab_size=4096, heads=4))


def test_untrained_mixer_near_zero_transformer_far_higher():
    ids = torch.randint(4, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    mixer = representation_error(_untrained("mixer"), ids)
    transformer = representation_error(_untrained("transformer"), ids)
    # the descent really fits the target (not a metric of a random start)
    assert mixer["l1_end"] < mixer["l1_start"] / 20
    assert mixer["error"] <= 0.05
    assert transformer["error"] >= 0.25
    assert transformer["error"] >= mixer["error"] + 0.2
    # a random start that is never optimised recovers (almost) nothing
    assert representation_error(_untrained("mixer"), ids, steps=1)["error"] > 0.9


def test_layer_and_padding_and_cli(tmp_path):
    from mmscale.export.format import save_export
    from tests._data_helpers import make_tiny_corpus

    torch.manual_seed(0)
    cfg = ModelConfig(kind="mixer", d_model=32, n_layers=3, n_ctx=16, vocab_size=512)
    model = build_model(cfg)
    ids = torch.randint(4, 512, (2, 16))
    ids[1, 10:] = 0
    r = representation_error(model, ids, layer=1, steps=50, ignore_id=0)
    assert r["positions"] == 16 + 10 and r["layer"] == 1
    with pytest.raises(UserError, match="--layer"):
        representation_error(model, ids, layer=4)

    text, tok = make_tiny_corpus(stories=200, vocab_size=512)
    export = save_export(tmp_path / "exp", model.state_dict(), cfg, tok)
    out = tmp_path / "rep.json"
    assert cli_main(["representation", str(export), "--data", str(text), "--samples", "2", "--steps", "100",
                     "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["positions"] == 32 and 0 <= got["error"] <= 0.2
