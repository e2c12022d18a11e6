"""The built-in story corpus: seeded, varied, identifying summaries that copy no sentence, learnable."""
from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from mmscale.cli import main as cli
from mmscale.data.sources import iter_text_documents
from mmscale.data.synth import COLORS, KINDS, OBJECTS, PLACES, core_of, generate_stories
from mmscale.errors import UserError
from tests._data_helpers import make_tiny_corpus


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_seeded():
    a, b, c = generate_stories(300, 1), generate_stories(300, 1), generate_stories(300, 2)
    assert [(s.text, s.summary) for s in a] == [(s.text, s.summary) for s in b]
    assert len({s.text for s in a} & {s.text for s in c}) == 0


def test_tens_of_thousands_of_distinct_stories_with_identifying_summaries():
    stories = generate_stories(30000, 0)
    assert len({s.text for s in stories}) == 30000
    assert len({s.summary for s in stories}) == 30000
    # every summary states its story's core, and no other story has that core
    assert len({core_of(s.plan) for s in stories}) == 30000
    for s in stories[:3000]:
        kind, place, obj, color, _ = core_of(s.plan)
        low = s.summary.lower()
        assert any(k in low for k in KINDS[kind]), s.summary
        assert any(p in low for p in PLACES[place][1]), s.summary
        assert f"{color} {obj}" in low or (color in low and obj in low), s.summary
    # varied: every name, kind, place, object and colour is used, stories have different lengths
    assert {s.plan["kind"] for s in stories} == set(KINDS)
    assert {s.plan["place"] for s in stories} == set(PLACES)
    assert {s.plan["obj"] for s in stories} == set(OBJECTS) and {s.plan["color"] for s in stories} == set(COLORS)
    assert len({s.plan["hero"] for s in stories}) == 80
    assert len({len(words(s.text)) for s in stories}) > 30


def test_summaries_copy_no_sentence_of_their_story():
    for s in generate_stories(2000, 3):
        sentences = [x.strip() for x in re.split(r"(?<=[.!?\"])\s+", s.text) if len(x.strip()) > 15]
        assert not any(x in s.summary for x in sentences)
        story_words, summary_words = words(s.text), words(s.summary)
        grams = {tuple(story_words[i:i + 7]) for i in range(len(story_words) - 6)}
        assert not any(tuple(summary_words[i:i + 7]) in grams for i in range(len(summary_words) - 6)), s.summary


def test_learnable_a_bigram_model_beats_the_unigram_entropy_by_far():
    """Held-out cross-entropy of a smoothed token bigram model (a very small model) against the
    entropy of the unigram distribution: the corpus has structure a model can learn."""
    import sentencepiece as spm

    _, tok = make_tiny_corpus(400, 0, 512)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    stories = [s.text for s in generate_stories(2400, 9)]
    train = [t for s in stories[:2000] for t in sp.encode(s) + [sp.eos_id()]]
    test = [t for s in stories[2000:] for t in sp.encode(s) + [sp.eos_id()]]
    vocab = sp.get_piece_size()
    unigram = (np.bincount(train, minlength=vocab) + 0.5) / (len(train) + 0.5 * vocab)
    entropy = float(-(unigram * np.log(unigram)).sum())
    follow = defaultdict(Counter)
    for prev, nxt in zip(train, train[1:]):
        follow[prev][nxt] += 1
    alpha = 0.5  # add-alpha towards the unigram
    nll = 0.0
    for prev, nxt in zip(test, test[1:]):
        c = follow[prev]
        nll -= math.log((c[nxt] + alpha * vocab * unigram[nxt]) / (sum(c.values()) + alpha * vocab))
    bigram_ce = nll / (len(test) - 1)
    assert entropy > 4.0
    assert bigram_ce < 0.5 * entropy, (bigram_ce, entropy)


def test_synth_command_writes_matching_stories_and_pairs(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert cli(["data", "synth", "--out", str(out), "--stories", "500", "--seed", "4"]) == 0
    docs = list(iter_text_documents(str(out / "stories.txt")))
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(docs) == len(pairs) == 500
    assert [p["passage"] for p in pairs] == docs
    assert [p["query"] for p in pairs] == [s.summary for s in generate_stories(500, 4)]
    before = (out / "stories.txt").read_bytes()
    capsys.readouterr()
    assert cli(["data", "synth", "--out", str(out), "--stories", "10"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert (out / "stories.txt").read_bytes() == before
    assert cli(["data", "synth", "--out", str(out), "--stories", "10", "--overwrite"]) == 0
    assert len(list(iter_text_documents(str(out / "stories.txt")))) == 10
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "stories.txt"]
    assert cli(["data", "synth", "--out", str(tmp_path / "x"), "--stories", "0"]) == 2  # cli.conventions.check_counts
    assert "--stories must be >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli(["data", "synth", "--out", str(tmp_path / "file"), "--stories", "5"]) == 1
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(UserError):
        generate_stories(-1)
