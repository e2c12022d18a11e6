"""Near-duplicate documents are never negatives (word 3-shingle Jaccard >= 0.8, found by MinHash and checked
exactly), and a bidirectional model embeds a text the same in retrieval training and in evaluation."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmscale.retrieval.collection import load_beir
from mmscale.retrieval.neardup import NEAR_DUP_JACCARD, jaccard, near_duplicates, shingles

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ("the committee reviewed the annual budget of the public library and proposed new rules for lending "
        "rare books to students and visiting scholars during the summer months of next year")


def test_shingles_and_jaccard_by_hand():
    assert shingles("A b, c d!") == {"a b c", "b c d"}
    assert shingles("two words") == {"two words"} and shingles("  ") == set()
    # 30 words -> 28 shingles; changing the 15th word removes 3 shingles and adds 3: J = 25 / 31
    words = BASE.split()
    assert len(words) == 30
    changed = " ".join(words[:14] + ["periodicals"] + words[15:])
    assert jaccard(shingles(BASE), shingles(changed)) == pytest.approx(25 / 31)


def test_near_duplicates_on_hand_made_documents():
    words = BASE.split()
    docs = [
        BASE,                                                        # 0
        " ".join(words[:14] + ["periodicals"] + words[15:]),          # 1: one word changed, J 25/31 = 0.81
        BASE.upper() + " !",                                          # 2: case and punctuation only: J 1
        " ".join(words[:10] + ["x", "y", "z"] + words[13:]),          # 3: three words changed: J 0.56 (not)
        "a different text about rockets that fly to the moon with fuel",   # 4
        BASE,                                                        # 5: an exact duplicate of 0
        "",                                                          # 6: empty
        "",                                                          # 7: empty (an exact duplicate of 6)
    ]
    got = near_duplicates(docs)
    assert got[0] == {0, 1, 2, 5} and got[5] == {0, 1, 2, 5}
    assert got[1] == {0, 1, 2, 5} and got[2] == {0, 1, 2, 5}
    assert got[3] == {3} and got[4] == {4}
    assert got[6] == {6, 7} and got[7] == {6, 7}
    assert jaccard(shingles(docs[0]), shingles(docs[3])) < NEAR_DUP_JACCARD


def test_near_duplicates_equal_brute_force_jaccard():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(40)]
    docs = []
    for _ in range(60):
        if docs and rng.random() < 0.5:   # an edited copy of an earlier document: 0-4 words replaced
            w = rng.choice(docs).split()
            for _ in range(rng.randint(0, 4)):
                w[rng.randrange(len(w))] = rng.choice(vocab)
            docs.append(" ".join(w))
        else:
            docs.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40))))
    sh = [shingles(d) for d in docs]
    want = [{j for j in range(len(docs)) if j == i or jaccard(sh[i], sh[j]) >= NEAR_DUP_JACCARD}
            for i in range(len(docs))]
    got = near_duplicates(docs)
    assert got == want
    assert sum(len(x) > 1 for x in want) >= 10     # the case is exercised


def test_near_duplicates_are_never_training_negatives(tmp_path):
    from mmscale.retrieval.pairs import CorpusPairs, PairGroups

    words = BASE.split()
    corpus = [{"_id": "a", "title": "", "text": BASE},
              {"_id": "b", "title": "", "text": " ".join(words[:14] + ["periodicals"] + words[15:])}]
    corpus += [{"_id": f"o{i}", "title": "", "text": f"other text number {i} on topic {i * 7} with words {i}"}
               for i in range(6)]
    root = tmp_path / "c"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "library budget"}) + "\n")
    (root / "qrels" / "train.tsv").write_text("q\ta\t1\n")
    coll = load_beir(root, "train")
    assert coll.excluded()[0].tolist() == [0]                 # evaluation: exact duplicates only
    assert coll.excluded(near=True)[0].tolist() == [0, 1]     # training: the near-duplicate too
    docs = [[10 + i] for i in range(coll.n_docs)]
    for gather in (False, True):
        g = PairGroups([[99]], docs, [[1, 2, 3]], group_size=8, micro_batch=1, n_ctx=4, seed=0, pairs=[(0, 0)],
                       excluded=coll.excluded(near=True), hard_per_group=None, gather=gather)
        for k in range(20):
            _, cands, _ = g.group_docs(k)
            assert cands[0] == 0 and 1 not in cands[1:]
    # corpus pairs: a crop of document a never has b as its negative (or in the gathered mask it is masked)
    views = CorpusPairs([[]] * coll.n_docs, [[5] * 9] * coll.n_docs, [[]] * coll.n_docs, coll.duplicate_sets(),
                        n_ctx=8, seed=0)
    g = PairGroups([[99]], docs, [[]], group_size=8, micro_batch=1, n_ctx=8, seed=0, pairs=[("corpus", "crop", 0)],
                   excluded=[np.array([0])], views=views)
    for k in range(20):
        _, cands, excl = g.group_docs(k)
        assert excl == {0, 1} and not {0, 1} & {c for c in cands[1:] if isinstance(c, int)}


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_bidirectional_embeddings_agree_between_training_and_evaluation(kind):
    from mmscale.config import ModelConfig
    from mmscale.retrieval.embedder import Embedder, pad_batch, pooled_embeddings
    from mmscale.models import build_model
    from mmscale.retrieval.pairs import PairGroups

    n_ctx = 16
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_model=32, n_layers=2, n_ctx=n_ctx, vocab_size=64,
                                    bidirectional=True)).eval()

    class Tok:
        def pad_id(self):
            return 0

    emb = Embedder(model, Tok(), position="mean")
    short, long_ = [5, 6, 7, 8], list(range(10, 22))
    # the training path: a group [query, positive, negative] padded by PairGroups, pooled as the loss pools it
    g = PairGroups([short], [long_, [30, 31]], [[]], group_size=3, micro_batch=1, n_ctx=n_ctx, seed=0,
                   pairs=[(0, 0)])
    batch = g.batch_at(0)
    lengths = batch["labels"][:3]
    with torch.no_grad():
        trained = pooled_embeddings(model, batch["input_ids"], lengths, "mean").double()
    for batch_size in (1, 2, 3):   # evaluation: alone, or beside a longer text (another padded width)
        got = torch.from_numpy(emb.encode_ids([short, long_, [30, 31]], batch_size=batch_size)).double()
        assert torch.allclose(got, trained, atol=1e-5)
    # the test can fail: pad-token embeddings in the padding (what training fed before) embed it differently
    ids, lens = pad_batch([short], 0, n_ctx)
    with torch.no_grad():
        other = torch.nn.functional.normalize(model.hidden(ids)[0, :len(short)].double().mean(0), dim=0)
    assert not torch.allclose(other, trained[0], atol=1e-3)
    if kind == "mixer":   # zero-vector padding is the text alone (what the mixer and the HF export compute)
        with torch.no_grad():
            alone = torch.nn.functional.normalize(model.hidden(torch.tensor([short]))[0].double().mean(0), dim=0)
        assert torch.allclose(alone, trained[0], atol=1e-5)


def test_idf_pooling_is_the_idf_weighted_mean_by_hand():
    import math

    import torch.nn.functional as F

    from mmscale.config import ModelConfig
    from mmscale.retrieval.embedder import Embedder, idf_weights, pad_batch, parse_position, pooled_embeddings
    from mmscale.models import build_model

    docs = [[5, 6, 7], [5, 8], [5, 6, 9, 9], []]
    w = idf_weights(docs, 12)
    n = 4
    df = {5: 3, 6: 2, 7: 1, 8: 1, 9: 1}
    for t in range(12):   # hand count: 9 twice in one document counts once
        want = math.log(1 + (n - df.get(t, 0) + 0.5) / (df.get(t, 0) + 0.5))
        assert float(w[t]) == pytest.approx(want, rel=1e-6)
    assert parse_position("idf") == "idf"
    torch.manual_seed(1)
    model = build_model(ModelConfig(kind="mixer", d_model=32, n_layers=1, n_ctx=8, vocab_size=12)).eval()
    seqs = [[5, 6, 7], [9, 5], [8]]
    ids, lengths = pad_batch(seqs, 0)
    with torch.no_grad():
        got = pooled_embeddings(model, ids, lengths, "idf", w)
        for i, s in enumerate(seqs):
            h = model.hidden(torch.tensor([s]))[0].double()
            ws = w.double()[torch.tensor(s)]
            assert torch.allclose(got[i].double(), F.normalize((h * ws[:, None]).sum(0) / ws.sum(), dim=0),
                                  atol=1e-5)
    with pytest.raises(Exception, match="token weights"):
        pooled_embeddings(model, ids, lengths, "idf", None)

    class Tok:
        def pad_id(self):
            return 0

        def encode(self, texts):
            return [[int(x) for x in t.split()] for t in texts]

    emb = Embedder(model, Tok(), position="idf")
    emb.set_corpus(["5 6 7", "5 8", "5 6 9 9", ""])
    assert torch.allclose(emb.token_weights, w)
    assert np.allclose(emb.encode_ids(seqs, batch_size=2), got.numpy(), atol=1e-5)


def test_report_shows_retrieval_statistics_and_the_collapse_warning(tmp_path):
    from mmscale import report

    rows = [{"step": s, "time": 1000.0 + s, "loss": 3.3, "lr": 1e-3, "step_time": 1.0, "tokens": 100 * s,
             "inbatch_acc": a, "inbatch_chance": 0.0625, "doc_cos": c, "alignment": 0.5, "uniformity": -1.0}
            for s, a, c in ((5, 0.30, 0.50), (10, 0.40, 0.80), (15, 0.05, 0.95))]
    for name, rs in (("ret", rows), ("ok", rows[:2]), ("lm", [{"step": 1, "loss": 5.0}])):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    page = report.build_html([report.load_run(tmp_path / "ret")])
    assert 'id="retrieval-table"' in page and "ret (best accuracy)" in page
    assert 'data-key="inbatch_acc">0.400<' in page            # the best row, by accuracy
    assert "warning: step 15: the embeddings collapsed" in page
    page = report.build_html([report.load_run(tmp_path / "ok")])
    assert 'id="retrieval-table"' in page and "collapsed" not in page
    page = report.build_html([report.load_run(tmp_path / "lm")])
    assert 'id="retrieval"' not in page
