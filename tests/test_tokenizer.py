"""Tokenizer training: lossless round trip, fixed special ids, the command, bad input; external models."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from mmscale.cli import main as cli
from mmscale.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, load_tokenizer, special_ids, train_tokenizer
from mmscale.errors import UserError
from tests._data_helpers import make_tiny_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MISTRAL = SHARED / "tokenizers" / "mistral_32k.model"


def _random_text(rng: random.Random, n: int) -> str:
    """Text a normaliser would damage: runs of spaces, tabs, CR, leading/trailing blanks, digits,
    accents in both Unicode forms, CJK, emoji, symbols never seen in training."""
    alphabet = list("abcxyz ABC  \t\n\r0123456789.,!?'\"") + ["  ", "\n\n", "é", "e\u0301", "ß", "ﬁ",
                                                              "中文", "🙂", "Ω", "\u00a0", "\u3000", "∑"]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_tokenizer_is_lossless_with_fixed_special_ids(tmp_path, model_type):
    text, _ = make_tiny_corpus(400, 0, 512)
    out = train_tokenizer([str(text)], 600, tmp_path / "tok.model", model_type=model_type)
    sp = load_tokenizer(out)
    assert sp.get_piece_size() == 600
    assert special_ids(sp) == {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID} == \
        {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    rng = random.Random(0)
    samples = [_random_text(rng, rng.randint(0, 200)) for _ in range(200)]
    samples += [" leading", "trailing  ", "\n", "", "  two  spaces  ", Path(text).read_text()[:3000]]
    for s in samples:
        ids = sp.encode(s)
        assert UNK_ID not in ids, repr(s)  # byte fallback: nothing is unknown
        assert sp.decode(ids) == s, repr(s)


def test_same_input_and_seed_give_the_same_model(tmp_path):
    text, _ = make_tiny_corpus(400, 0, 512)
    a = train_tokenizer([str(text)], 520, tmp_path / "a.model")
    b = train_tokenizer([str(text)], 520, tmp_path / "b.model")
    assert a.read_bytes() == b.read_bytes()


def test_tokenizer_command_and_its_errors(tmp_path, capsys):
    text, _ = make_tiny_corpus(400, 0, 512)
    out = tmp_path / "tok.model"
    assert cli(["tokenizer", "train", "--data", str(text), "--vocab-size", "512", "--out", str(out)]) == 0
    assert "512 pieces" in capsys.readouterr().out
    before = out.read_bytes()
    # an existing model is not overwritten without --overwrite
    assert cli(["tokenizer", "train", "--data", str(text), "--vocab-size", "600", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert cli(["tokenizer", "train", "--data", str(text), "--vocab-size", "600", "--out", str(out),
                "--overwrite"]) == 0
    assert load_tokenizer(out).get_piece_size() == 600
    # bad input: one line each, non-zero, nothing written
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for argv, message in [
        (["--data", str(tmp_path / "missing.txt"), "--vocab-size", "512"], "does not exist"),
        (["--data", str(empty), "--vocab-size", "512"], "holds no text"),
        (["--data", str(text), "--vocab-size", "100"], "need at least"),
        (["--data", str(text), "--vocab-size", "4"], "at least 8"),
        (["--data", str(text), "--vocab-size", "8000"], "supports at most"),
    ]:
        target = tmp_path / "new.model"
        assert cli(["tokenizer", "train", *argv, "--out", str(target)]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not target.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece"):
        load_tokenizer(bogus)


@pytest.mark.shared_data
@pytest.mark.skipif(not MISTRAL.is_file(), reason=f"{MISTRAL} is absent (../shared/data only exists on dev/CI machines)")
def test_an_existing_32k_sentencepiece_model_loads_and_round_trips():
    sp = load_tokenizer(MISTRAL)
    assert sp.get_piece_size() == 32000
    ids = special_ids(sp)
    assert ids["eos"] >= 0 and ids["bos"] >= 0
    s = "Once upon a time, Lily found 42 shells. 🙂"
    assert sp.decode(sp.encode(s)) == s
