"""FSDP2 placement of the token-mixing weights [heads, k, T, T] (issue 24): rows when the shard group divides T;
a one-line warning when it cannot be split evenly (FSDP2 would pad every rank to a whole T x T)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Shard

from mmscale.config import ModelConfig
from mmscale.engines.fsdp import placement_fn, uneven_mixing_note
from mmscale.models import build_model


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_mixing_weights_split_on_rows_when_the_shard_group_divides_t(world):
    for t in (16, 24, 30):
        place = placement_fn(world)(torch.empty(1, 1, t, t))
        assert place == (Shard(2) if t % world == 0 else Shard(0)), (world, t)
        # what FSDP2 then keeps per rank, as a fraction of the weight: the first chunk of that dim, padded
        dim = place.dim
        size = (1, 1, t, t)[dim]
        held = -(-size // world) / size
        assert (held <= 1 / world + 1e-9) == (t % world == 0)
    assert placement_fn(2)(torch.empty(8, 4)) == Shard(0)


def test_a_shard_group_that_does_not_divide_n_ctx_is_named_in_one_line():
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_ctx=16, vocab_size=64, heads=1))
    assert uneven_mixing_note(model, 2) is None and uneven_mixing_note(model, 4) is None
    assert uneven_mixing_note(model, 1) is None
    note = uneven_mixing_note(model, 3)
    assert note is not None and "\n" not in note
    assert "n_ctx 16 is not a multiple of the 3 ranks" in note and "holds 100%" in note and "1/3" in note
