"""Retrieval on collections (BEIR layout): loading and its errors, import of raw formats, full-corpus
metrics against hand-computed values (graded relevance, several relevant documents, ties from duplicate
passages), fair top-1 among n, masks of relevant documents in training groups, chunked scoring, the
corpus cache, the BM25 row against a direct call of bm25s, and a short training run with mined negatives."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmscale.retrieval import metrics as ir_metrics
from mmscale.cli import main as cli_main
from mmscale.errors import UserError
from mmscale.retrieval.loss import info_nce, unpack_mask
from mmscale.retrieval.pairs import PairGroups
from mmscale.retrieval.collection import collection_from_pairs, load_beir, load_collection

pytestmark = pytest.mark.usefixtures("one_thread")


def write_beir(root: Path, corpus, queries, qrels, split="test", header=True) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / f"{split}.tsv").write_text(("query-id\tcorpus-id\tscore\n" if header else "")
                                                + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root


# a small collection with known relevance: several relevant documents per query (graded), an exact
# duplicate passage (d5 = d4), a query judged only non-relevant (dropped), and a query without judgments
CORPUS = [
    {"_id": "d0", "title": "Cats", "text": "the cat sat on the warm mat by the door"},
    {"_id": "d1", "title": "", "text": "a dog barked at the postman in the morning"},
    {"_id": "d2", "title": "Fish", "text": "goldfish swim in a round glass bowl of water"},
    {"_id": "d3", "title": "", "text": "kittens and cats sleep on soft mats all day"},
    {"_id": "d4", "title": "", "text": "rockets fly to the moon with fuel and fire"},
    {"_id": "d5", "title": "", "text": "rockets fly to the moon with fuel and fire"},
    {"_id": "d6", "title": "Birds", "text": "a small bird sang in the tall green tree"},
    {"_id": "d7", "title": "", "text": "bread is baked in a hot oven every morning"},
]
QUERIES = [{"_id": "qa", "text": "cats on mats"}, {"_id": "qb", "text": "fish in water"},
           {"_id": "qc", "text": "rockets to the moon"}, {"_id": "qz", "text": "nothing relevant here"},
           {"_id": "qn", "text": "not judged"}]
QRELS = [("qa", "d0", 2), ("qa", "d3", 1), ("qa", "d1", 0), ("qb", "d2", 1), ("qc", "d4", 1), ("qz", "d7", 0)]


@pytest.fixture
def small(tmp_path) -> Path:
    return write_beir(tmp_path / "small", CORPUS, QUERIES, QRELS)


# ---------------------------------------------------------------------------------------------
# loading

def test_load_beir_relevance_duplicates_and_dropped(small):
    c = load_beir(small)
    assert c.query_ids == ["qa", "qb", "qc"] and c.dropped_queries == 1 and c.judgments == 6
    assert c.relevant == [{0: 2.0, 3: 1.0}, {2: 1.0}, {4: 1.0}]
    assert c.doc_text(0) == "Cats the cat sat on the warm mat by the door" and c.doc_text(1).startswith("a dog")
    # never a negative or distractor: relevant documents and exact duplicates of them
    assert [e.tolist() for e in c.excluded()] == [[0, 3], [2], [4, 5]]
    assert c.split == "test" and load_collection(small).n_docs == 8


def test_pairs_are_a_collection_with_duplicates_merged(tmp_path):
    rows = [{"query": "q one", "passage": "p same"}, {"query": "q two", "passage": "p same"},
            {"query": "q one", "passage": "p other", "negatives": ["p neg", "p same"]}]
    c = collection_from_pairs(rows)
    assert c.queries == ["q one", "q two"] and c.texts == ["p same", "p other", "p neg"]
    assert c.relevant == [{0: 1.0, 1: 1.0}, {0: 1.0}]
    assert c.negatives == [[2], []]  # a given negative that is relevant to the query is dropped


BAD = {
    "missing _id": (lambda r: (r / "corpus.jsonl").write_text('{"title": "x", "text": "y"}\n'),
                    "corpus.jsonl:1 has no \"_id\""),
    "duplicate _id": (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a", "text": "y"}\n{"_id": "a", "text": "z"}\n'),
                      "duplicate document _id 'a'"),
    "unknown document": (lambda r: (r / "qrels" / "test.tsv").write_text("qa\tnope\t1\n"),
                         "test.tsv:1 names document 'nope', which is not in corpus.jsonl"),
    "unknown query": (lambda r: (r / "qrels" / "test.tsv").write_text("qq\td0\t1\n"),
                      "names query 'qq', which is not in queries.jsonl"),
    "empty query": (lambda r: (r / "queries.jsonl").write_text(
        "".join(json.dumps({**q, "text": "  " if q["_id"] == "qa" else q["text"]}) + "\n" for q in QUERIES)),
                    "query 'qa' has an empty \"text\""),
    "bad score": (lambda r: (r / "qrels" / "test.tsv").write_text("qa\td0\thigh\n"), "score 'high' is not a number"),
    "bad columns": (lambda r: (r / "qrels" / "test.tsv").write_text("qa d0\n"), "has 2 columns"),
    "no positive": (lambda r: (r / "qrels" / "test.tsv").write_text("qa\td0\t0\n"), "judges no document relevant"),
    "no corpus": (lambda r: (r / "corpus.jsonl").unlink(), "has no corpus.jsonl"),
    "bad json": (lambda r: (r / "queries.jsonl").write_text("{oops\n"), "queries.jsonl:1 is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_collections_are_one_line_errors(tmp_path, case, capsys):
    root = write_beir(tmp_path / case.replace(" ", "_"), CORPUS, QUERIES, QRELS)
    BAD[case][0](root)
    with pytest.raises(UserError, match=BAD[case][1].replace("(", r"\(").replace(")", r"\)")):
        load_beir(root)
    # through the CLI: exit status 1, one line on stderr, before any export is read
    assert cli_main(["retrieval", "eval", str(tmp_path / "no-export"), "--collection", str(root),
                     "--json", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD[case][1] in err, err


def test_split_choice(small):
    (small / "qrels" / "train.tsv").write_text("qb\td2\t1\n")
    assert load_beir(small).split == "test" and load_beir(small, prefer="train").split == "train"
    assert load_beir(small, "train").query_ids == ["qb"]
    with pytest.raises(UserError, match="--split must be one of test, train"):
        load_beir(small, "dev")
    (small / "qrels" / "test.tsv").unlink()
    (small / "qrels" / "dev.tsv").write_text("qb\td2\t1\n")
    with pytest.raises(UserError, match="several splits"):
        load_beir(small, prefer="test")


# ---------------------------------------------------------------------------------------------
# import

def test_import_smart_collection(tmp_path, capsys):
    docs = tmp_path / "DOCS.ALL"
    docs.write_text(".I 1\n.T\nCats and mats\n.A\nSomeone\n.W\nthe cat sat\non the mat\n.X\n1 5 1\n"
                    ".I 2\n.T\nDogs\n.W\na dog barked\n.I 5\n.W\nrockets fly\n")
    qry = tmp_path / "QRY"
    qry.write_text(".I 001\n.W\nwhere do cats sit\n.I 003\n.T\nRockets\n.W\nwhat flies\n")
    rel = tmp_path / "REL"
    rel.write_text("   1     1 0       0.000000\n   1     2 0       0.000000\n   3     5 0       0.000000\n")
    out = tmp_path / "coll"
    args = ["retrieval", "import", "--format", "smart", "--docs", str(docs), "--queries", str(qry),
            "--qrels", str(rel), "--out", str(out)]
    # the query ids of a SMART file are its '.I' numbers as written: '001' is not '1'
    assert cli_main(args) == 1
    assert "names query '1', which is not in" in capsys.readouterr().err
    qry.write_text(".I 1\n.W\nwhere do cats sit\n.I 3\n.T\nRockets\n.W\nwhat flies\n")
    assert cli_main(args) == 0
    assert "3 documents, 2 queries, 3 judgments" in capsys.readouterr().out
    c = load_beir(out)
    assert c.doc_ids == ["1", "2", "5"] and c.titles == ["Cats and mats", "Dogs", ""]
    assert c.texts == ["the cat sat on the mat", "a dog barked", "rockets fly"]
    assert c.queries == ["where do cats sit", "Rockets what flies"] and c.relevant == [{0: 1.0, 1: 1.0}, {2: 1.0}]
    # Cranfield-style: queries numbered by their order, graded scores where 1 is the most relevant
    rel.write_text("1 2 1\n2 5 3\n2 1 5\n")
    assert cli_main(args + ["--overwrite", "--query-ids", "order", "--relevance-map", "1:4,2:3,3:2,4:1,5:0"]) == 0
    c = load_beir(out)
    assert c.query_ids == ["1", "2"] and c.relevant == [{1: 4.0}, {2: 2.0}] and c.judgments == 3
    rel.write_text("1 9 1\n")
    assert cli_main(args + ["--overwrite"]) == 1
    assert "names document '9', which is not in" in capsys.readouterr().err
    assert cli_main(args) == 1 and "already holds a collection" in capsys.readouterr().err


def test_import_pairs(tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "a", "passage": "x"}, {"query": "b", "passage": "x"}, {"query": "c", "passage": "y"}]))
    assert cli_main(["retrieval", "import", "--format", "pairs", "--pairs", str(pairs), "--out",
                     str(tmp_path / "c"), "--split", "train"]) == 0
    c = load_beir(tmp_path / "c")
    assert c.split == "train" and c.texts == ["x", "y"] and c.relevant == [{0: 1.0}, {0: 1.0}, {1: 1.0}]
    assert (tmp_path / "c" / "qrels" / "train.tsv").read_text().splitlines() == [
        "query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td1\t1", "q3\td2\t1"]
    # a held-out fraction of the queries: disjoint train and test splits over the same corpus
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i % 7}"}) + "\n" for i in range(20)))
    assert cli_main(["retrieval", "import", "--format", "pairs", "--pairs", str(pairs), "--out",
                     str(tmp_path / "s"), "--test-fraction", "0.25", "--seed", "3"]) == 0
    train, test = load_beir(tmp_path / "s", "train"), load_beir(tmp_path / "s", "test")
    assert len(test.queries) == 5 and len(train.queries) == 15 and not set(train.queries) & set(test.queries)
    assert train.n_docs == test.n_docs == 7


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed values

def test_metrics_hand_computed():
    L = math.log2
    # query a: grades d0 = 2, d3 = 1; ranking d0, d1, d3, ...
    m = ir_metrics.query_metrics(np.array([0.9, 0.8, 0.1, 0.7, 0.3, 0.2]), {0: 2.0, 3: 1.0})
    assert m["ndcg@10"] == pytest.approx((2 / L(2) + 1 / L(4)) / (2 / L(2) + 1 / L(3)))
    assert m["recall@10"] == 1.0 and m["mrr@10"] == 1.0 and m["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    # query b: its document third
    m = ir_metrics.query_metrics(np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.0]), {2: 1.0})
    assert m["ndcg@10"] == pytest.approx(0.5) and m["mrr@10"] == pytest.approx(1 / 3) and m["map"] == pytest.approx(1 / 3)
    # query c: its document ties with a duplicate at the top: half the time first, half second
    m = ir_metrics.query_metrics(np.array([0.1, 0.2, 0.3, 0.0, 0.6, 0.6]), {4: 1.0})
    assert m["ndcg@10"] == pytest.approx(0.5 * (1 / L(2) + 1 / L(3)))
    assert m["mrr@10"] == pytest.approx(0.75) and m["map"] == pytest.approx(0.75) and m["recall@10"] == 1.0
    # beyond the cut-offs: 12 documents score higher
    row = np.concatenate([np.linspace(2, 1, 12), [0.5, 0.4]])
    m = ir_metrics.query_metrics(row, {12: 1.0, 0: 3.0})
    assert m["mrr@10"] == 1.0 and m["recall@10"] == 0.5 and m["recall@100"] == 1.0
    assert m["ndcg@10"] == pytest.approx(3 / (3 + 1 / L(3)))
    assert m["map"] == pytest.approx((1 + 2 / 13) / 2)
    m = ir_metrics.query_metrics(row, {12: 1.0})
    assert m["mrr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["map"] == pytest.approx(1 / 13)


def _plain_metrics(order, relevant, k=3):
    """nDCG@k, Recall@k, MRR@k and AP of one fixed ranking (document indices best first), no ties."""
    gains = [relevant.get(d, 0.0) for d in order]
    ideal = sorted(relevant.values(), reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    hits = [i for i, g in enumerate(gains) if g > 0]
    ap = sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / len(relevant)
    rr = 1 / (hits[0] + 1) if hits and hits[0] < k else 0.0
    return {"ndcg": dcg / idcg, "recall": sum(g > 0 for g in gains[:k]) / len(relevant), "mrr": rr, "map": ap}


def test_tied_metrics_equal_the_average_over_every_tie_order():
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = 7
        row = rng.integers(0, 3, size=n).astype(np.float64)      # many ties
        rel_docs = rng.choice(n, size=rng.integers(1, 4), replace=False)
        relevant = {int(d): float(rng.integers(1, 4)) for d in rel_docs}
        # every ranking consistent with the scores, equally likely
        levels = sorted(set(row.tolist()), reverse=True)
        groups = [[d for d in range(n) if row[d] == v] for v in levels]
        orders = [sum(map(list, combo), []) for combo in itertools.product(*[itertools.permutations(g) for g in groups])]
        avg = {k: np.mean([_plain_metrics(o, relevant)[k] for o in orders]) for k in ("ndcg", "recall", "mrr", "map")}
        rel_idx = np.array(list(relevant)), np.array(list(relevant.values()))
        got = ir_metrics.metrics_from_groups(ir_metrics.tie_groups(row, *rel_idx), rel_idx[1], k_ndcg=3,
                                             k_recall=(3,), k_mrr=3)
        assert [got["ndcg@3"], got["recall@3"], got["mrr@3"], got["map"]] == pytest.approx(
            [avg["ndcg"], avg["recall"], avg["mrr"], avg["map"]], abs=1e-12)


def test_fair_top1_splits_ties():
    assert ir_metrics.fair_top1(0.5, np.array([0.1, 0.2])) == (1.0, 1.0)
    hit, rr = ir_metrics.fair_top1(0.5, np.array([0.5, 0.1, 0.5]))
    assert hit == pytest.approx(1 / 3) and rr == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    hit, rr = ir_metrics.fair_top1(0.5, np.array([0.6, 0.5, 0.2]))
    assert hit == 0.0 and rr == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_evaluator_never_draws_a_relevant_document_and_averages_pairs(small):
    c = load_beir(small)
    scores = np.random.default_rng(1).normal(size=(3, 8))
    ev = ir_metrics.Evaluator(c.relevant, c.excluded(), c.n_docs, [3, 6], seed=4, record=True)
    ev.add([0, 1, 2], scores)
    res = ev.result()
    for n in (3, 6):
        draws = ev.draws[n]
        assert [(q, d) for q, d, _ in draws] == [(0, 0), (0, 3), (1, 2), (2, 4)]  # every (query, relevant) pair
        for q, d, dis in draws:
            assert len(set(dis.tolist())) == n - 1 and not set(dis.tolist()) & set(c.excluded()[q].tolist())
        hits = [ir_metrics.fair_top1(scores[q, d], scores[q, dis]) for q, d, dis in draws]
        row = next(r for r in res["top1"] if r["candidates"] == n)
        assert row["pairs"] == 4 and row["top1"] == pytest.approx(np.mean([h for h, _ in hits]))
        assert row["mrr"] == pytest.approx(np.mean([r for _, r in hits]))
    assert res["map"] == pytest.approx(np.mean([ir_metrics.query_metrics(scores[i], c.relevant[i])["map"]
                                                for i in range(3)]))
    # qc excludes d4 and d5: at most 6 other documents, so n = 7 is refused
    with pytest.raises(UserError, match="needs 2 <= n <= 7"):
        ir_metrics.Evaluator(c.relevant, c.excluded(), c.n_docs, [8])


def test_blocked_and_chunked_scoring():
    rng = np.random.default_rng(2)
    q, d = rng.normal(size=(5, 4)), rng.normal(size=(9, 4))
    assert np.allclose(ir_metrics.dot_scorer(q, d, doc_block=2)(np.arange(5)), q @ d.T, atol=1e-5)
    starts = np.array([0, 3, 4, 8])        # documents of 3, 1, 4 and 1 chunks
    got = ir_metrics.dot_scorer(q, d, starts)(np.array([1, 4]))
    s = q[[1, 4]] @ d.T
    want = np.stack([s[:, 0:3].max(1), s[:, 3], s[:, 4:8].max(1), s[:, 8]], axis=1)
    assert np.allclose(got, want, atol=1e-5)
    top = ir_metrics.top_k(q, d, 3, backend="numpy")
    assert (top == np.argsort(-(q @ d.T), axis=1)[:, :3]).all()
    if ir_metrics.have_faiss():
        assert (ir_metrics.top_k(q, d, 3, backend="faiss") == top).all()


# ---------------------------------------------------------------------------------------------
# training groups: relevant documents are never negatives, masked when gathered

def _multi_groups(rank, world, mb, gather, hard=None):
    # 6 queries, 10 documents; query 0 has relevant docs 0, 1, 2 (doc 9 duplicates doc 0), query 1 has 0 and 3
    rel = [{0: 1, 1: 1, 2: 1}, {0: 1, 3: 1}, {4: 1}, {5: 1}, {6: 1}, {7: 1, 8: 1}]
    excluded = [np.array(sorted(set(r) | ({9} if 0 in r else set()))) for r in rel]
    pairs = [(q, d) for q, r in enumerate(rel) for d in sorted(r)]
    queries = [[100 + i] for i in range(6)]
    docs = [[200 + i] for i in range(10)]
    negs = hard or [[] for _ in rel]
    return PairGroups(queries, docs, negs, group_size=5, micro_batch=mb, n_ctx=4, seed=1, rank=rank, world=world,
                      pairs=pairs, excluded=excluded, gather=gather, hard_per_group=None if hard is None else 2), excluded


@pytest.mark.parametrize("gather", [False, True])
def test_groups_never_use_relevant_documents_as_negatives(gather):
    hard = [[9, 5, 6], [9, 1, 2], [5], [], [], [1]]   # mined lists may hold relevant docs: they are skipped
    one, excluded = _multi_groups(0, 1, 4, gather, hard)
    two = [_multi_groups(r, 2, 2, gather, hard)[0] for r in range(2)]
    for k in range(12):  # three epochs of 10 pairs
        b = one.batch_at(k)
        ids = b["input_ids"].view(4, 5, 4)[:, :, 0]
        queries = (ids[:, 0] - 100).tolist()
        cand_docs = (ids[:, 1:] - 200).tolist()
        for qi, cands in zip(queries, cand_docs):
            assert cands[0] in excluded[qi]                                  # the positive
            assert not set(cands[1:]) & set(excluded[qi].tolist())           # never a relevant negative
            assert len(set(cands)) == 5 - 1
        C = 4 * 4 if gather else 4
        mask = unpack_mask(b["labels"][20:], 4, C)
        flat = [d for g in cand_docs for d in g]
        for b_, qi in enumerate(queries):
            cols = flat if gather else cand_docs[b_]
            own = b_ * 4 if gather else 0
            want = [j != own and d in excluded[qi] for j, d in enumerate(cols)]
            assert mask[b_].tolist() == want
        # 2 ranks: the same global batch, each rank the rows of its queries against every rank's candidates
        rows = [unpack_mask(h.batch_at(k)["labels"][10:], 2, C) for h in two]
        assert torch.equal(torch.cat(rows), mask)
        assert torch.equal(torch.cat([h.batch_at(k)["input_ids"] for h in two]), b["input_ids"])
    if gather:  # query 0 and query 1 share document 0: somewhere it is masked as the other's positive
        assert any(unpack_mask(one.batch_at(k)["labels"][20:], 4, 16).any() for k in range(12))


def test_masked_info_nce_matches_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, G, d, tau = 3, 4, 6, 0.1
    emb = F.normalize(torch.randn(B * G, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.zeros(B, B * (G - 1), dtype=torch.bool)
    mask[0, 4] = mask[0, 7] = mask[2, 1] = True
    allc = torch.cat([emb[b * G + 1:(b + 1) * G] for b in range(B)])
    total = 0.0
    for b in range(B):
        s = (allc @ emb[b * G] / tau).tolist()
        keep = [x for j, x in enumerate(s) if not mask[b, j]]
        total += -(s[b * (G - 1)] - math.log(sum(math.exp(x) for x in keep)))
    from mmscale.retrieval.loss import pack_mask
    got = info_nce(emb.float(), G, tau, gather=True, mask=pack_mask(mask))
    assert float(got) == pytest.approx(total / B, rel=1e-5)
    assert float(info_nce(emb.float(), G, tau, gather=True, mask=mask)) == pytest.approx(total / B, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# with a model: chunks, cache, BM25 row, CLI, training

N_CTX = 16


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny untrained mixer export with the tokenizer of the built-in corpus (n_ctx 16)."""
    from mmscale.config import ModelConfig
    from mmscale.export.format import save_export
    from mmscale.models import build_model
    from tests._data_helpers import make_tiny_corpus

    _, tok = make_tiny_corpus(400, 0, 512)
    cfg = ModelConfig(kind="mixer", d_model=32, n_layers=1, n_ctx=N_CTX, vocab_size=512)
    torch.manual_seed(0)
    model = build_model(cfg)
    root = tmp_path_factory.mktemp("ret-export")
    save_export(root / "export", model.state_dict(), cfg, tok)
    return root / "export"


LONG = "the little cat went to the park and played with a red ball until the sun went down over the hill"


@pytest.fixture
def long_coll(tmp_path) -> Path:
    corpus = [dict(d) for d in CORPUS]
    corpus[2]["text"] = LONG + " and then " + LONG       # several windows
    corpus[6]["text"] = LONG
    return write_beir(tmp_path / "long", corpus, QUERIES, QRELS + [("qb", "d6", 2)])


def test_max_chunk_scores_are_the_best_window_by_hand(export, long_coll, tmp_path):
    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.evaluate import evaluate_export

    res = evaluate_export(str(export), str(long_coll), [3], passage_mode="max_chunk", cache_dir=tmp_path / "cache",
                          baseline=False, progress=False, record=True)
    c = load_beir(long_coll)
    emb = Embedder.from_export(export)
    sp = emb.tokenizer
    q = emb.encode(c.queries)
    by_hand = np.zeros((len(c.queries), c.n_docs))
    n_cut = 0
    for i in range(c.n_docs):
        title, text = sp.encode(c.titles[i]) if c.titles[i] else [], sp.encode(c.texts[i])
        step = N_CTX - len(title)
        wins = [title + text[s:s + step] for s in range(0, len(text), step)]
        n_cut += len(wins) > 1
        w = emb.encode_ids(wins)
        by_hand[:, i] = (q @ w.T).max(1)
    assert n_cut >= 2 and res["truncated"]["documents"] == n_cut
    ev = res["_evaluators"]["model"]
    for qi in range(len(c.queries)):
        want = ir_metrics.query_metrics(by_hand[qi].astype(np.float32), c.relevant[qi])
        assert ev.per_query[qi] == pytest.approx(want, abs=1e-5)
    # truncate: the first n_ctx tokens of title + text, and the count of what was cut
    res = evaluate_export(str(export), str(long_coll), [3], baseline=False, progress=False)
    full = [sp.encode(c.doc_text(i)) for i in range(c.n_docs)]
    assert res["truncated"]["documents"] == sum(len(x) > N_CTX for x in full) >= 2
    assert res["n_queries"] == 3 and res["n_corpus"] == 8 and res["n_relevant"] == 5


def test_corpus_cache_reused_and_invalidated_when_the_export_changes(export, small, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.evaluate import evaluate_export

    exp = tmp_path / "export"
    shutil.copytree(export, exp)
    cache = tmp_path / "cache"
    calls = []
    real = Embedder.encode_ids

    def counting(self, seqs, **kw):
        calls.append(len(seqs))
        return real(self, seqs, **kw)

    Embedder.encode_ids = counting
    try:
        kw = dict(cache_dir=cache, baseline=False, progress=False)
        first = evaluate_export(str(exp), str(small), [3], **kw)
        assert first["corpus_cache"]["hit"] is False and calls == [3, 8]          # queries, corpus
        second = evaluate_export(str(exp), str(small), [3], **kw)
        assert second["corpus_cache"]["hit"] is True and calls == [3, 8, 3]       # the corpus from the cache
        assert second["metrics"] == first["metrics"] and len(list(cache.glob("corpus-*.npz"))) == 1
        before = np.load(first["corpus_cache"]["path"])["emb"]
        # another passage mode is another cache entry
        evaluate_export(str(exp), str(small), [3], passage_mode="first_window", **kw)
        assert calls[-1] == 8
        # the export changes: recomputed, and the stale files of this export go
        state = load_file(str(exp / "model.safetensors"))
        state["embed.weight"] = state["embed.weight"] + 0.5 * torch.randn_like(state["embed.weight"])
        save_file(state, str(exp / "model.safetensors"), metadata={"format": "pt"})
        third = evaluate_export(str(exp), str(small), [3], **kw)
        assert third["corpus_cache"]["hit"] is False and calls[-1] == 8
        assert not np.allclose(np.load(third["corpus_cache"]["path"])["emb"], before)
        assert not Path(first["corpus_cache"]["path"]).exists() and len(list(cache.glob("corpus-*.npz"))) == 2
        fourth = evaluate_export(str(exp), str(small), [3], **kw)
        assert fourth["corpus_cache"]["hit"] is True and fourth["metrics"] == third["metrics"]
    finally:
        Embedder.encode_ids = real


def test_bm25_row_equals_a_direct_call_of_bm25s(export, small, tmp_path):
    import bm25s

    from mmscale.retrieval.evaluate import evaluate_export

    res = evaluate_export(str(export), str(small), [3, 5], baseline=True, progress=False, record=True)
    c = load_beir(small)
    docs = [(d["title"] + " " + d["text"]).strip() for d in CORPUS]
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    rows = np.stack([retriever.get_scores(bm25s.tokenize([q], stopwords="en", show_progress=False,
                                                         return_ids=False)[0]) for q in c.queries])
    assert rows[0, 0] > 0 and rows[2, 4] == rows[2, 5] > 0
    want = [ir_metrics.query_metrics(rows[i], c.relevant[i]) for i in range(3)]
    assert res["baseline"]["metrics"] == pytest.approx({k: np.mean([w[k] for w in want]) for k in ir_metrics.METRICS})
    lex, model = res["_evaluators"]["bm25"], res["_evaluators"]["model"]
    for n in (3, 5):
        # exactly the same candidate sets as the model's
        assert all(a[:2] == b[:2] and (a[2] == b[2]).all() for a, b in zip(lex.draws[n], model.draws[n]))
        hits = [ir_metrics.fair_top1(rows[q, d], rows[q, dis]) for q, d, dis in lex.draws[n]]
        got = next(r for r in res["baseline"]["results"] if r["candidates"] == n)
        assert got["top1"] == pytest.approx(np.mean([h for h, _ in hits]))
    # qc's document ties with its duplicate d5, which is never a distractor: BM25 finds it
    assert lex.per_query[2]["mrr@10"] == pytest.approx(0.75)


def test_eval_cli_table_json_and_no_baseline(export, small, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli_main(["retrieval", "eval", str(export), "--collection", str(small), "--candidates", "3,5",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "nDCG@10" in table and "MAP" in table and "BM25" in table and "3 queries, 8 documents" in table
    res = json.loads(out.read_text())
    assert res["n_queries"] == 3 and res["n_corpus"] == 8 and res["dropped_queries"] == 1
    assert set(res["metrics"]) == set(ir_metrics.METRICS) and res["baseline"]["results"][1]["candidates"] == 5
    assert (tmp_path / "retrieval_cache").is_dir()
    assert cli_main(["retrieval", "eval", str(export), "--collection", str(small), "--no-baseline", "--no-cache",
                     "--json", str(out), "--overwrite", "--candidates", "3", "--no-progress"]) == 0
    assert "BM25" not in capsys.readouterr().out and json.loads(out.read_text())["baseline"] is None
    # a bare --json: the JSON alone on stdout, the table on stderr
    assert cli_main(["retrieval", "eval", str(export), "--collection", str(small), "--no-baseline", "--no-cache",
                     "--candidates", "3", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_corpus"] == 8 and "nDCG@10" in captured.err
    assert cli_main(["retrieval", "eval", str(export), "--collection", str(small), "--candidates", "8",
                     "--json", str(tmp_path / "x.json")]) == 1
    assert "needs 2 <= n <= 7" in capsys.readouterr().err


def test_train_on_a_collection_with_mined_negatives(export, long_coll, tmp_path, capsys):
    from mmscale.retrieval.bm25 import BM25Index
    from mmscale.config import config_from_dict
    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.corpus import mine_negatives
    from mmscale.retrieval.train import prepare_config, train_retrieval

    (long_coll / "qrels" / "train.tsv").write_text((long_coll / "qrels" / "test.tsv").read_text())
    tree = {"engine": {"kind": "single", "precision": "fp32"},
            "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "eval_every": 0},
            "retrieval": {"group_size": 4, "temperature": 0.05, "gather_negatives": True},
            "checkpoint": {"every": 0}, "run": {"dir": str(tmp_path / "run")},
            "log": {"wandb": "disabled", "progress": False}}
    cfg = prepare_config(config_from_dict(tree), str(export), None, str(long_coll), "train", "bm25")
    assert train_retrieval(cfg) == 0
    out = capsys.readouterr().out
    assert "3 queries, 8 documents" in out and "longer than n_ctx 16" in out
    cached = list((tmp_path / "run" / "retrieval_cache").glob("negatives-bm25-*.json"))
    assert len(cached) == 1
    c = load_beir(long_coll, "train")
    mined = json.loads(cached[0].read_text())["negatives"]
    scores = BM25Index(c.doc_texts()).scores(c.queries)
    for qi, negs in enumerate(mined):
        assert not set(negs) & set(c.excluded()[qi].tolist())
        rest = [d for d in np.argsort(-scores[qi], kind="stable") if d not in c.excluded()[qi]]
        assert sorted(scores[qi][negs].tolist(), reverse=True) == pytest.approx(scores[qi][rest].tolist())
    # a second mining reads the cache (a changed file would be returned as is)
    cached[0].write_text(json.dumps({"negatives": [[7], [7], [7]]}))
    assert mine_negatives("bm25", c, depth=32, cache_dir=cached[0].parent) == [[7], [7], [7]]
    # the export's own embeddings: top documents by dot product, relevant ones skipped
    got = mine_negatives("model", c, depth=2, export=str(export), cache_dir=tmp_path / "mc")
    emb = Embedder.from_export(export)
    s = emb.encode(c.queries) @ emb.encode(c.doc_texts()).T
    for qi in range(3):
        rest = [int(d) for d in np.argsort(-s[qi], kind="stable") if d not in c.excluded()[qi]]
        assert len(got[qi]) == 2 and not set(got[qi]) & set(c.excluded()[qi].tolist())
        assert s[qi][got[qi]] == pytest.approx(s[qi][rest[:2]], abs=1e-6)
    bad = tmp_path / "bad"
    write_beir(bad, CORPUS, QUERIES, [("qa", "d0", 1), ("qa", "zz", 1)], split="train")
    assert cli_main(["retrieval", "train", "--init", str(export), "--collection", str(bad),
                     f"run.dir={tmp_path / 'r2'}", "--no-progress"]) == 1
    assert "names document 'zz'" in capsys.readouterr().err


def test_passage_modes_token_layout(export, long_coll):
    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.corpus import doc_sequences

    c = load_beir(long_coll)
    sp = Embedder.from_export(export).tokenizer
    i = 2  # "Fish" + a text of several windows
    title, text, whole = sp.encode(c.titles[i]), sp.encode(c.texts[i]), sp.encode(c.doc_text(i))
    trunc, starts, cut = doc_sequences(sp, c, N_CTX, "truncate")
    assert trunc[i] == whole[:N_CTX] and starts.tolist() == list(range(8))
    assert cut == sum(len(sp.encode(c.doc_text(j))) > N_CTX for j in range(8))
    first, starts, _ = doc_sequences(sp, c, N_CTX, "first_window")
    assert first[i] == title + text[:N_CTX - len(title)] and len(first) == 8
    chunks, starts, _ = doc_sequences(sp, c, N_CTX, "max_chunk")
    n_win = math.ceil(len(text) / (N_CTX - len(title)))
    assert n_win >= 3 and starts[i + 1] - starts[i] == n_win
    assert chunks[starts[i] + 1] == title + text[N_CTX - len(title):2 * (N_CTX - len(title))]
    assert all(len(x) <= N_CTX for x in chunks)
    # an untitled document: first_window is truncate
    assert first[1] == trunc[1]


# ---------------------------------------------------------------------------------------------
# issue 29: pairs from the corpus, the collapse statistics, the hybrid row, empty documents

def _corpus_pairs(n_ctx=12, seed=0):
    from mmscale.retrieval.pairs import CorpusPairs

    titles = [[1, 2], [], [3], [1, 2]]
    sentences = [[[10, 11, 12], [13, 14, 15, 16], [17, 18, 19]], [[20, 21, 22, 23, 24, 25, 26, 27, 28]],
                 [[30, 31]], [[10, 11, 12], [13, 14, 15, 16], [17, 18, 19]]]
    texts = [[t for s in ss for t in s] for ss in sentences]
    dups = [{0, 3}, {1}, {2}, {0, 3}]   # doc 3 repeats doc 0
    return CorpusPairs(titles, texts, sentences, dups, n_ctx, seed), titles, texts, sentences


def test_corpus_pair_builders_on_a_hand_made_corpus():
    from mmscale.retrieval.pairs import parse_corpus_pairs

    cp, titles, texts, sentences = _corpus_pairs()
    assert cp.eligible("title-body") == [0, 2, 3]            # a title and a text
    assert cp.eligible("crop") == [0, 1, 3]                  # 8+ tokens
    assert cp.eligible("ict") == [0, 3]                      # 2+ sentences
    q, p, ex = cp.view(("corpus", "title-body", 0), 5)
    assert q == [1, 2] and p == texts[0] and ex == {0, 3}
    seen = set()
    for t in range(40):
        q, p, ex = cp.view(("corpus", "crop", 0), t)
        doc = titles[0] + texts[0]                            # 12 tokens: query spans of 2..6, the window all 12
        assert 2 <= len(q) <= 6 and any(doc[s:s + len(q)] == q for s in range(len(doc)))
        assert p == doc[:12] and ex == {0, 3}
        seen.add(tuple(q))
        assert cp.view(("corpus", "crop", 0), t) == (q, p, ex)   # the same stream position, the same view
        q, p, _ = cp.view(("corpus", "crop", 1), t)           # 9 tokens: query 1..5, the window all 9
        assert 1 <= len(q) <= 5 and p == texts[1]
        q, p, _ = cp.view(("corpus", "ict", 0), t)
        j = sentences[0].index(q)                              # one of its sentences ...
        assert p == titles[0] + [x for k, s in enumerate(sentences[0]) if k != j for x in s]   # ... cut out
    assert len(seen) > 5
    long_cp, *_ = _corpus_pairs(n_ctx=4)                       # even 10% of the document is more than n_ctx
    for t in range(10):
        q, p, _ = long_cp.view(("corpus", "crop", 0), t)
        assert len(q) <= 4 and len(p) == 4
    short, *_ = _corpus_pairs(n_ctx=8)
    for t in range(20):
        q, p, _ = short.view(("corpus", "crop", 0), t)
        doc = titles[0] + texts[0]
        assert len(p) == 8 and any(doc[s:s + 8] == p for s in range(5)) and 2 <= len(q) <= 6
        q, p, _ = short.view(("corpus", "ict", 0), t)
        assert q in sentences[0][:2] and len(p) <= 8          # sentences starting in the first 3/4 of the window
    assert parse_corpus_pairs("corpus:crop") == (["crop"], False)
    assert parse_corpus_pairs("corpus:title-body|ict+judged") == (["title-body", "ict"], True)
    for bad in ("corpus:", "corpus:judged", "corpus:crops", "crop"):
        with pytest.raises(UserError, match="corpus:MODE"):
            parse_corpus_pairs(bad)


@pytest.mark.parametrize("gather", [False, True])
def test_groups_of_corpus_pairs_mixed_with_judged_queries(gather):
    cp, titles, texts, _ = _corpus_pairs()
    docs = [(titles[i] + texts[i])[:12] for i in range(4)] + [[40 + i] for i in range(6)]
    rel = [{4: 1}, {5: 1}]
    excluded = [np.array([4]), np.array([5])]
    pairs = [(0, 4), (1, 5)] + cp.items(["crop", "ict"])
    g = PairGroups([[100], [101]], docs, [[], []], group_size=4, micro_batch=5, n_ctx=12, seed=2, pairs=pairs,
                   excluded=excluded, gather=gather, views=cp)
    assert len(pairs) == 7
    kinds = set()
    for k in range(6):
        b = g.batch_at(k)
        ids = b["input_ids"].view(5, 4, 12)
        mask = unpack_mask(b["labels"][20:], 5, 15 if gather else 3)
        for row in range(5):
            t = k * 5 + row
            item = g._pair_at(t)
            query, cands, excl = g.group_docs(t)
            kinds.add(item[1] if len(item) == 3 else "judged")
            assert ids[row, 0, :len(query)].tolist() == query
            if len(item) == 3:
                want_q, want_p, want_ex = cp.view(item, t)
                assert query == want_q and cands[0] == want_p and excl == want_ex
            # negatives are documents never excluded for this pair (the source document and its duplicate)
            assert all(isinstance(x, int) and x not in excl for x in cands[1:])
            if not gather:
                assert not mask[row].any()
    assert kinds == {"judged", "crop", "ict"}


@pytest.mark.parametrize("world", [1, 2])
def test_views_of_one_document_are_never_each_others_negatives(world):
    """corpus:crop+ict: a crop and a sentence of one document (or of its duplicate) in one gathered batch are
    masked as each other's negatives, like the document itself; the reference is a hand mapping of every
    candidate column to its source document."""
    cp, titles, texts, _ = _corpus_pairs()
    dups = [{0, 3}, {1}, {2}, {0, 3}]
    docs = [(titles[i] + texts[i])[:12] for i in range(4)] + [[40 + i] for i in range(6)]
    pairs = [(0, 4)] + cp.items(["crop", "ict"])          # judged q0 -> d4; crop of d0, d1, d3; ict of d0, d3
    assert sorted(p[1:] for p in pairs[1:]) == [("crop", 0), ("crop", 1), ("crop", 3), ("ict", 0), ("ict", 3)]
    G, B = 3, 6 // world                                   # one epoch (6 items) in each global batch
    ranks = [PairGroups([[100]], docs, [[]], group_size=G, micro_batch=B, n_ctx=12, seed=5, pairs=pairs,
                        excluded=[np.array([4])], gather=True, views=cp, rank=r, world=world) for r in range(world)]
    hits = 0
    for k in range(4):
        items = [ranks[0]._pair_at(t) for t in range(k * 6, (k + 1) * 6)]
        cands = [ranks[0].group_docs(t)[1] for t in range(k * 6, (k + 1) * 6)]
        # the source document of every gathered column: a corpus item's positive is its document
        source = [(it[2] if len(it) == 3 else it[1]) if j == 0 else c
                  for it, cs in zip(items, cands) for j, c in enumerate(cs)]
        assert len(source) == 6 * (G - 1) and all(isinstance(x, int) for x in source)
        for r, g in enumerate(ranks):
            mask = unpack_mask(g.batch_at(k)["labels"][B * G:], B, 6 * (G - 1))
            for b in range(B):
                row = r * B + b
                it = items[row]
                never = dups[it[2]] if len(it) == 3 else {4}
                own = row * (G - 1)
                want = [c != own and source[c] in never for c in range(6 * (G - 1))]
                assert mask[b].tolist() == want, (k, r, b)
                # the case this guards: another view of the query's own document (or its duplicate)
                hits += sum(want[u * (G - 1)] for u in range(6) if u != row and len(items[u]) == 3
                            and len(it) == 3)
    assert hits >= 8          # crop/ict of d0 and d3 meet in every batch: 12 such columns per batch


def test_batch_stats_and_collapse_warning_by_hand():
    from mmscale.retrieval.loss import batch_stats, info_nce
    from mmscale.retrieval.stats import RetrievalStats

    g = torch.Generator().manual_seed(3)
    B, G, d = 3, 4, 5
    emb = F.normalize(torch.randn(B * G, d, generator=g, dtype=torch.float64), dim=-1)
    groups = emb.view(B, G, d)
    stats = RetrievalStats()
    info_nce(emb.float(), G, 0.1, stats=stats)
    row, note = stats.read(7)
    acc = align = 0.0
    for b in range(B):
        s = [float(groups[b, 0] @ groups[b, j]) for j in range(1, G)]
        acc += float(s[0] > max(s[1:]))
        align += float(((groups[b, 0] - groups[b, 1]) ** 2).sum())
    docs = groups[:, 1:].reshape(-1, d)
    pairs = [(i, j) for i in range(len(docs)) for j in range(len(docs)) if i != j]
    cos = np.mean([float(docs[i] @ docs[j]) for i, j in pairs])
    unif = math.log(np.mean([math.exp(-2 * float(((docs[i] - docs[j]) ** 2).sum())) for i, j in pairs]))
    assert row["inbatch_acc"] == pytest.approx(acc / B) and row["inbatch_chance"] == pytest.approx(1 / 3)
    assert row["alignment"] == pytest.approx(align / B, rel=1e-5) and row["doc_cos"] == pytest.approx(cos, rel=1e-5)
    assert row["uniformity"] == pytest.approx(unif, rel=1e-5) and note is None
    assert stats.read(8) == ({}, None)                         # nothing since the last read
    # a tie with k other candidates counts 1 / (k + 1); masked candidates are not candidates
    logits = torch.tensor([[1.0, 1.0, 0.0, float("-inf")], [2.0, 3.0, 3.0, 1.0]])
    s = batch_stats(torch.zeros(2, 2), torch.zeros(2, 3, 2), logits, torch.tensor([0, 1]))
    assert s["acc"] == pytest.approx(0.5 + 1 / 2) and s["chance"] == pytest.approx(1 / 3 + 1 / 4)
    # collapsed embeddings: one warning line, once, when the collapsed batches hold COLLAPSE_QUERIES queries (64:
    # 22 reads of B = 3; one read is not enough evidence at a few queries per log step)
    from mmscale.retrieval.stats import COLLAPSE_QUERIES

    stats = RetrievalStats()
    same = F.normalize(torch.ones(B * G, d), dim=-1)
    notes = []
    for step in range(1, 30):
        info_nce(same, G, 0.1, stats=stats)
        row, note = stats.read(step)
        assert row["doc_cos"] == pytest.approx(1.0) and row["inbatch_acc"] == pytest.approx(1 / 3)
        assert row["inbatch_queries"] == B
        notes += [(step, note)] if note else []
    assert COLLAPSE_QUERIES == 64 and [s for s, _ in notes] == [22]
    note = notes[0][1]
    assert "collapsing" in note and "\n" not in note and "over the last 66 queries" in note
    assert "mean pairwise cosine 1.000" in note


def test_collapse_rule_reads_a_window_of_queries_not_one_noisy_log_step():
    """What an experiment's retrieval fine-tune logs (4 queries a step, a pretrained start near cosine 0.9): the
    first rows look collapsed one at a time, but their window does not; a real collapse is flagged once the
    window holds 64 queries; rows without query counts (older metrics.jsonl) are read one at a time as before."""
    from mmscale.retrieval.stats import first_collapse

    noisy = [{"step": i, "doc_cos": 0.91 - 0.01 * i, "inbatch_acc": [0.0, 0.0, 0.5, 0.25][i % 4],
              "inbatch_chance": 0.036, "inbatch_queries": 4} for i in range(1, 40)]
    assert noisy[0]["doc_cos"] >= 0.9 and noisy[0]["inbatch_acc"] < 2 * 0.036     # one row alone: "collapsed"
    assert first_collapse(noisy) is None                                         # the window: accuracy 0.19
    stuck = [{"step": i, "doc_cos": 0.97, "inbatch_acc": 0.03, "inbatch_chance": 0.031, "inbatch_queries": 32}
             for i in range(1, 6)]
    row, w = first_collapse(stuck)
    assert row["step"] == 2 and w["queries"] == 64 and w["doc_cos"] == pytest.approx(0.97)
    old = [{k: v for k, v in r.items() if k != "inbatch_queries"} for r in noisy[:3]]
    assert first_collapse(old)[0]["step"] == 1


def test_rrf_and_paired_difference_by_hand():
    bm = np.array([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 5.0, 1.0]])
    dense = np.array([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.3, 0.1]])
    assert ir_metrics.min_ranks(bm).tolist() == [[1, 4, 2, 2], [3, 3, 1, 2]]     # ties share the best rank
    k = 60
    want = [[1 / (k + 1) + 1 / (k + 4), 1 / (k + 4) + 1 / (k + 1), 1 / (k + 2) + 1 / (k + 2), 1 / (k + 2) + 1 / (k + 3)],
            [1 / (k + 3) + 1 / (k + 3), 1 / (k + 3) + 1 / (k + 1), 1 / (k + 1) + 1 / (k + 2), 1 / (k + 2) + 1 / (k + 4)]]
    assert ir_metrics.rrf_scores([bm, dense]) == pytest.approx(np.array(want))
    f = ir_metrics.rrf_scorer([lambda idx: bm[idx], lambda idx: dense[idx]])
    assert f(np.array([1])) == pytest.approx(np.array(want[1:]))
    p = ir_metrics.paired_difference([0.5, 0.2, 0.9, 0.4], [0.3, 0.2, 0.6, 0.6])
    d = np.array([0.2, 0.0, 0.3, -0.2])
    assert p["mean"] == pytest.approx(d.mean()) and p["n"] == 4
    assert p["se"] == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / 3) / 2)
    assert (p["wins"], p["ties"], p["losses"]) == (2, 1, 1)


def test_eval_has_a_hybrid_row_and_paired_comparison(export, small, tmp_path, capsys):
    from mmscale.retrieval.bm25 import BM25Index
    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.evaluate import evaluate_export

    res = evaluate_export(str(export), str(small), [3], progress=False, record=True)
    c = load_beir(small)
    emb = Embedder.from_export(export)
    dense = emb.encode(c.queries) @ emb.encode_ids([sp[:N_CTX] for sp in emb.tokenizer.encode(c.doc_texts())]).T
    lex = BM25Index(c.doc_texts()).scores(c.queries)
    fused = ir_metrics.rrf_scores([lex, dense])
    hyb = res["_evaluators"]["hybrid"]
    per = [ir_metrics.query_metrics(fused[q], c.relevant[q]) for q in range(3)]
    for q in range(3):
        assert hyb.per_query[q] == pytest.approx(per[q], abs=1e-6)
    assert res["hybrid"]["metrics"]["ndcg@10"] == pytest.approx(np.mean([m["ndcg@10"] for m in per]))
    bm = res["_evaluators"]["bm25"]
    want = ir_metrics.paired_difference([m["ndcg@10"] for m in per], [m["ndcg@10"] for m in bm.per_query])
    assert res["paired_ndcg@10"]["hybrid - bm25"] == pytest.approx(want, nan_ok=True)
    assert cli_main(["retrieval", "--no-progress", "eval", str(export), "--collection", str(small), "--candidates",
                     "3", "--json", str(tmp_path / "e.json"), "--no-cache"]) == 0
    out = capsys.readouterr()
    assert "hybrid (BM25+model)" in out.out and "paired per-query nDCG@10, hybrid - bm25" in out.out
    assert "reciprocal-rank fusion" in out.out and "\r" not in out.err        # no train split; --no-progress
    # with train queries: score interpolation, its weight chosen on them (never on the evaluated queries)
    (small / "qrels" / "train.tsv").write_text("qa\td3\t1\nqb\td2\t1\nqc\td5\t1\n")
    res = evaluate_export(str(export), str(small), [3], progress=False, record=True, split="test")
    tr = load_beir(small, "train")
    dtr = emb.encode(tr.queries) @ emb.encode_ids([sp[:N_CTX] for sp in emb.tokenizer.encode(c.doc_texts())]).T
    w, table = ir_metrics.choose_weight(BM25Index(c.doc_texts()).scores(tr.queries), dtr, tr.relevant)
    assert res["hybrid"]["weight"] == w and "chosen on the 3 train queries" in res["hybrid"]["name"]
    fused = ir_metrics.interpolate_scores(lex, dense, w)
    for q in range(3):
        assert res["_evaluators"]["hybrid"].per_query[q] == pytest.approx(
            ir_metrics.query_metrics(fused[q], c.relevant[q]), abs=1e-6)
    # a dev split is preferred (a model fine-tuned on the train queries overrates itself there); or a given weight
    (small / "qrels" / "dev.tsv").write_text("qa\td0\t1\n")
    res = evaluate_export(str(export), str(small), [3], progress=False, split="test")
    assert "chosen on the 1 dev queries" in res["hybrid"]["name"]
    res = evaluate_export(str(export), str(small), [3], progress=False, split="test", hybrid_fixed=0.0)
    assert res["hybrid"]["weight"] == 0.0 and res["hybrid"]["metrics"] == pytest.approx(res["baseline"]["metrics"])
    with pytest.raises(UserError, match="is the evaluated split"):
        evaluate_export(str(export), str(small), [3], progress=False, split="test", hybrid_split="test")


def test_interpolation_weight_by_hand():
    lexical = np.array([[2.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    dense = np.array([[0.1, 0.3, 0.2], [0.0, 1.0, 0.5]])
    assert ir_metrics.minmax_rows(lexical).tolist() == [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert ir_metrics.interpolate_scores(lexical, dense, 0.25) == pytest.approx(
        np.array([[0.75, 0.25, 0.5], [0.0, 0.25, 0.125]]))
    # query 0 wants doc 1 (only the dense scores rank it first), query 1 doc 2
    w, table = ir_metrics.choose_weight(lexical, dense, [{1: 1.0}, {2: 1.0}])
    fused = {x: ir_metrics.interpolate_scores(lexical, dense, x) for x in table}
    for x, v in table.items():
        assert v == pytest.approx(np.mean([ir_metrics.query_metrics(fused[x][i], r)["ndcg@10"]
                                           for i, r in enumerate([{1: 1.0}, {2: 1.0}])]))
    assert table[w] == max(table.values()) and all(table[x] < table[w] for x in table if x < w)
    assert w == 0.55          # doc 1 beats doc 0 for query 0 once 0.45 * 1 < 0.55 * 1, i.e. w > 0.5


def test_import_keeps_empty_records_and_they_embed(export, tmp_path, capsys):
    from mmscale.retrieval.bm25 import BM25Index
    from mmscale.retrieval.embedder import Embedder
    from mmscale.retrieval.corpus import doc_sequences, empty_text_tokens
    from mmscale.retrieval.evaluate import evaluate_export

    docs = tmp_path / "DOCS.ALL"
    docs.write_text(".I 1\n.T\nCats and mats\n.W\nthe cat sat\n.I 2\n.A\nNobody\n.X\n1 2 3\n"
                    ".I 3\n.W\nrockets fly to the moon\n.I 4\n.I 5\n.W\ndogs bark\n")
    (tmp_path / "QRY").write_text(".I 1\n.W\nwhere do cats sit\n.I 2\n.W\nrockets\n")
    (tmp_path / "REL").write_text("1 1\n1 2\n2 3\n2 4\n")
    out = tmp_path / "coll"
    assert cli_main(["retrieval", "import", "--format", "smart", "--docs", str(docs), "--queries",
                     str(tmp_path / "QRY"), "--qrels", str(tmp_path / "REL"), "--out", str(out)]) == 0
    assert "5 documents (2 without .T or .W text, kept as empty documents)" in capsys.readouterr().out
    c = load_beir(out)
    assert c.doc_ids == ["1", "2", "3", "4", "5"] and c.texts[1] == c.texts[3] == "" and c.empty_docs == 2
    assert c.relevant == [{0: 1.0, 1: 1.0}, {2: 1.0, 3: 1.0}] and "2 without text" in c.summary()
    sp = Embedder.from_export(export).tokenizer
    for mode in ("truncate", "first_window", "max_chunk"):
        seqs, starts, _ = doc_sequences(sp, c, N_CTX, mode)
        assert seqs[starts[1]] == seqs[starts[3]] == empty_text_tokens(sp) == [sp.eos_id()]
    assert BM25Index(c.doc_texts()).scores(["cats"]).shape == (1, 5)
    res = evaluate_export(str(export), str(out), [2], progress=False, passage_mode="max_chunk")
    assert res["n_corpus"] == 5 and res["corpus_windows"] == 5 and res["hybrid"] is not None


def test_mean_pooling_is_the_mean_over_real_tokens():
    from mmscale.config import ModelConfig
    from mmscale.retrieval.embedder import parse_position, pad_batch, pooled_embeddings
    from mmscale.models import build_model

    torch.manual_seed(0)
    for kind in ("mixer", "transformer"):
        model = build_model(ModelConfig(kind=kind, d_model=32, n_layers=1, n_ctx=N_CTX, vocab_size=64)).eval()
        seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
        ids, lengths = pad_batch(seqs, 0)
        with torch.no_grad():
            got = pooled_embeddings(model, ids, lengths, parse_position("mean"))
            for i, s in enumerate(seqs):
                h = model.hidden(torch.tensor([s])).double()[0]
                assert torch.allclose(got[i].double(), F.normalize(h.mean(0), dim=0), atol=1e-5)
            wide = torch.zeros(3, N_CTX, dtype=torch.long)
            wide[:, :ids.shape[1]] = ids                         # more padding changes nothing (causal)
            assert torch.allclose(pooled_embeddings(model, wide, lengths, "mean"), got, atol=1e-5)
    with pytest.raises(UserError, match="'last', 'mean' or an integer index \\(or 'idf'"):
        parse_position("avg")
    # export-hf's sentence-transformers pooling agrees (left padding too)
    from mmscale.export.hf_pooling import TokenPooling

    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    got = TokenPooling(3, "mean")({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    want = torch.stack([hidden[0, :2].mean(0), hidden[1, 1:].mean(0)])
    assert torch.allclose(got, F.normalize(want, dim=-1), atol=1e-6)


def test_experiment_retrieval_spec_keys(tmp_path):
    from mmscale.experiment import SpecError, parse_spec
    from tests.test_experiment import tiny_spec

    ret = parse_spec(tiny_spec(), tmp_path).retrieval
    assert (ret["pairs"], ret["position"], ret["gather_negatives"], ret["passage_mode"]) == ("", "mean", True,
                                                                                           "truncate")
    spec = tiny_spec(retrieval={"steps": 2, "pairs": "corpus:crop+ict+judged", "position": "last",
                                "gather_negatives": False, "passage_mode": "max_chunk"},
                     data={"text": "synth", "vocab_size": 512, "retrieval": str(tmp_path)})
    ret = parse_spec(spec, tmp_path).retrieval
    assert (ret["pairs"], ret["position"], ret["gather_negatives"], ret["passage_mode"]) == (
        "corpus:crop+ict+judged", "last", False, "max_chunk")
    for bad, key in (({"pairs": "corpus:crops"}, "retrieval.pairs"), ({"position": "avg"}, "retrieval.position"),
                     ({"passage_mode": "all"}, "retrieval.passage_mode")):
        with pytest.raises(SpecError, match=key):
            parse_spec(tiny_spec(retrieval={"steps": 2, **bad}), tmp_path)


def test_corpus_pairs_fine_tune_raises_in_batch_accuracy(export, tmp_path, capsys):
    """A tiny end-to-end run on title -> body pairs made from a corpus: metrics.jsonl has the retrieval columns and
    the in-batch accuracy rises from chance (measured 0.05 -> 0.53 over 40 steps)."""
    from mmscale.config import config_from_dict
    from mmscale.retrieval.train import prepare_config, train_retrieval
    from tests._data_helpers import make_tiny_corpus

    text, _ = make_tiny_corpus(400, 0, 512)
    stories = [s.strip() for s in text.read_text().split("<|endoftext|>") if s.strip()]
    words = sorted({w for s in stories for w in s.split() if w.isalpha() and w.islower() and len(w) > 4})
    # title -> body with titles that share no word with the bodies: at first the model cannot match them
    corpus = [{"_id": f"s{i}", "title": words[3 * i], "text": " ".join(s.split()[30:42])}
              for i, s in enumerate(stories[:48])]
    coll = write_beir(tmp_path / "stories", corpus, [{"_id": "q", "text": stories[0][:40]}], [("q", "s0", 1)],
                      split="train")
    tree = {"engine": {"kind": "single", "precision": "fp32"},
            "train": {"max_steps": 40, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0},
            "retrieval": {"group_size": 4, "temperature": 0.05, "gather_negatives": True},
            "checkpoint": {"every": 0}, "run": {"dir": str(tmp_path / "run"), "seed": 0},
            "log": {"wandb": "disabled", "progress": False, "every": 5}}
    cfg = prepare_config(config_from_dict(tree), str(export), "corpus:title-body", str(coll))
    assert cfg.retrieval.position == "mean"
    assert train_retrieval(cfg) == 0
    assert "pairs per epoch: title-body 48 (judged queries not used)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "inbatch_acc" in r]
    assert len(rows) == 8 and all(0 <= r["inbatch_acc"] <= 1 and -1 <= r["doc_cos"] <= 1 for r in rows)
    assert 1 / 24 <= rows[0]["inbatch_chance"] < 1 / 20       # 8 x 3 candidates, the source documents masked
    first, last = np.mean([r["inbatch_acc"] for r in rows[:2]]), np.mean([r["inbatch_acc"] for r in rows[-2:]])
    assert last > first + 0.2, (first, last)
    with pytest.raises(UserError, match="pass --collection DIR too"):
        prepare_config(config_from_dict(tree), str(export), "corpus:crop", None)
