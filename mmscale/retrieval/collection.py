"""Retrieval collections: a corpus, queries and relevance judgments, in the BEIR layout.

    DIR/corpus.jsonl     {"_id": "d1", "title": "...", "text": "..."}      one document a line
    DIR/queries.jsonl    {"_id": "q1", "text": "..."}
    DIR/qrels/SPLIT.tsv  query-id <TAB> corpus-id <TAB> score               (a header line is allowed)

A score > 0 is relevant (graded: the score is the gain of nDCG); 0 or less is judged not relevant.
Only the queries with at least one relevant judgment in the split are evaluated or trained on.

A pairs file (JSONL {"query", "passage"[, "negatives"]}) is a collection too: every pair is a query
with one relevant passage; identical passages become one document and identical queries one query
(so two pairs that share a passage do not make it its own distractor).

`mmscale retrieval import` (importer.py) writes the layout from raw files: a pairs JSONL, or a classic SMART-style
collection (records `.I id`, fields `.T` title, `.W` text, others ignored) with a qrels file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmscale.errors import UserError, utf8_problem
from mmscale.retrieval.neardup import near_duplicates

LAYOUT_HINT = ("a BEIR-layout directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or a pairs JSONL; "
               "convert raw files with `mmscale retrieval import`")


@dataclass
class Collection:
    doc_ids: list[str]
    titles: list[str]
    texts: list[str]
    query_ids: list[str]
    queries: list[str]
    relevant: list[dict[int, float]]            # per query: {doc index: grade > 0}
    negatives: list[list[int]] = field(default_factory=list)   # per query: given hard negatives (doc indices)
    source: str = ""
    split: str = ""
    judgments: int = 0                           # lines of the qrels used (relevant or not)
    dropped_queries: int = 0                     # queries of the split without a relevant judgment
    _excluded: list | None = field(default=None, repr=False)
    _excluded_near: list | None = field(default=None, repr=False)
    _dups: list | None = field(default=None, repr=False)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def doc_text(self, i: int) -> str:
        return f"{self.titles[i]} {self.texts[i]}".strip() if self.titles[i] else self.texts[i]

    def doc_texts(self) -> list[str]:
        return [self.doc_text(i) for i in range(self.n_docs)]

    def excluded(self, near: bool = False) -> list[np.ndarray]:
        """Per query: the sorted doc indices that must never be its negatives or distractors, its relevant
        documents and every document whose text is identical to one of them; with `near` (training negatives),
        also every near-duplicate of one (`duplicate_sets`)."""
        if near:
            if self._excluded_near is None:
                dups = self.duplicate_sets()
                self._excluded_near = [np.array(sorted({j for d in rel for j in dups[d]}), dtype=np.int64)
                                       for rel in self.relevant]
            return self._excluded_near
        if self._excluded is None:
            by_text: dict[str, list[int]] = {}
            for i in range(self.n_docs):
                by_text.setdefault(self.doc_text(i), []).append(i)
            self._excluded = [np.array(sorted({j for d in rel for j in by_text[self.doc_text(d)]}), dtype=np.int64)
                              for rel in self.relevant]
        return self._excluded

    def duplicate_sets(self) -> list[set[int]]:
        """Per document: itself, the documents with identical text and its near-duplicates (word 3-shingle
        Jaccard >= NEAR_DUP_JACCARD, `near_duplicates`), computed once."""
        if self._dups is None:
            self._dups = near_duplicates(self.doc_texts())
        return self._dups

    def fingerprint(self) -> str:
        """A hash of the documents (ids, titles, texts in order): the key of corpus caches."""
        h = hashlib.sha256()
        for i in range(self.n_docs):
            for s in (self.doc_ids[i], self.titles[i], self.texts[i]):
                h.update(s.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()

    def fingerprint_all(self) -> str:
        """The documents, the queries and the judgments (the key of mined negatives)."""
        h = hashlib.sha256(self.fingerprint().encode())
        for qid, text, rel in zip(self.query_ids, self.queries, self.relevant):
            h.update(json.dumps([qid, text, sorted(rel.items())]).encode())
        return h.hexdigest()

    @property
    def empty_docs(self) -> int:
        """Documents with neither title nor text (kept; they embed as empty text)."""
        return sum(1 for t, x in zip(self.titles, self.texts) if not t and not x)

    def summary(self) -> str:
        empty = self.empty_docs
        return (f"{len(self.queries)} queries, {self.n_docs} documents"
                + (f" ({empty} without text, kept as empty)" if empty else "")
                + f", {sum(len(r) for r in self.relevant)} relevant judgments")

# ---------------------------------------------------------------------------------------------
# reading

def _jsonl(path: Path, kind: str):
    # binary or non-UTF-8 files: one line naming the place, before any parsing
    problem, line_no, offset = utf8_problem(path)
    if problem == "not_utf8":
        raise UserError(f"{path}:{line_no} is not UTF-8 text (byte offset {offset}); give a JSONL "
                        f"file, one {kind} object per line")
    if problem == "nul":
        raise UserError(f"{path} holds NUL bytes (a binary file?); give a JSONL file, one {kind} object "
                        "per line")
    if problem == "truncated":
        raise UserError(f"{path} ends inside a UTF-8 character (truncated?); give a complete JSONL file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON; each line must be one {kind} object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n} is not a JSON object; each line must be one {kind} object")
            yield n, row


def _id_of(row: dict, path: Path, n: int, kind: str) -> str:
    rid = row.get("_id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        raise UserError(f"{path}:{n} has no \"_id\"; every {kind} needs a unique string \"_id\"")
    return rid.strip()


def _text_field(row: dict, name: str, path: Path, n: int) -> str:
    v = row.get(name, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise UserError(f"{path}:{n}: \"{name}\" must be a string")
    return v.strip()


def read_corpus(path: Path):
    ids, titles, texts, seen = [], [], [], {}
    for n, row in _jsonl(path, "document"):
        did = _id_of(row, path, n, "document")
        if did in seen:
            raise UserError(f"{path}:{n}: duplicate document _id '{did}' (first on line {seen[did]}); ids must be unique")
        seen[did] = n
        title, text = _text_field(row, "title", path, n), _text_field(row, "text", path, n)
        # a document without text is kept (real collections have them, and judge them): it embeds as empty text
        ids.append(did)
        titles.append(title)
        texts.append(text)
    if not ids:
        raise UserError(f"{path} holds no documents; give one JSON object per line with \"_id\" and \"text\"")
    return ids, titles, texts


def read_queries(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    queries, line_of = {}, {}
    for n, row in _jsonl(path, "query"):
        qid = _id_of(row, path, n, "query")
        if qid in line_of:
            raise UserError(f"{path}:{n}: duplicate query _id '{qid}' (first on line {line_of[qid]}); ids must be unique")
        line_of[qid] = n
        queries[qid] = _text_field(row, "text", path, n)
    if not queries:
        raise UserError(f"{path} holds no queries; give one JSON object per line with \"_id\" and \"text\"")
    return queries, line_of


def read_qrels(path: Path) -> list[tuple[str, str, float, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split("\t") if "\t" in line else line.split()
            if not parts or not line.strip():
                continue
            if n == 1 and parts[0].lower() in ("query-id", "query_id", "qid", "query"):
                continue  # the BEIR header
            if len(parts) != 3:
                raise UserError(f"{path}:{n} has {len(parts)} columns; qrels lines are 'query-id<TAB>corpus-id<TAB>score'")
            try:
                score = float(parts[2])
            except ValueError:
                raise UserError(f"{path}:{n}: score {parts[2]!r} is not a number; qrels lines are "
                                "'query-id<TAB>corpus-id<TAB>score'") from None
            rows.append((parts[0].strip(), parts[1].strip(), score, n))
    return rows


def choose_split(qrels_dir: Path, split: str | None, prefer: str) -> Path:
    files = sorted(qrels_dir.glob("*.tsv"))
    if not files:
        raise UserError(f"'{qrels_dir}' holds no SPLIT.tsv qrels file; add e.g. qrels/test.tsv "
                        "(query-id, corpus-id, score)")
    names = [f.stem for f in files]
    if split:
        if split not in names:
            raise UserError(f"no qrels/{split}.tsv in '{qrels_dir.parent}'; --split must be one of {', '.join(names)}")
        return qrels_dir / f"{split}.tsv"
    if prefer in names:
        return qrels_dir / f"{prefer}.tsv"
    if len(files) == 1:
        return files[0]
    raise UserError(f"'{qrels_dir}' holds several splits ({', '.join(names)}) and none is '{prefer}'; pass --split NAME")


def load_beir(path: str | os.PathLike, split: str | None = None, prefer: str = "test") -> Collection:
    root = Path(path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels"):
        if not (root / name).exists():
            raise UserError(f"collection '{root}' has no {name}; give {LAYOUT_HINT}")
    ids, titles, texts = read_corpus(root / "corpus.jsonl")
    doc_index = {d: i for i, d in enumerate(ids)}
    qtext, qline = read_queries(root / "queries.jsonl")
    qrels_path = choose_split(root / "qrels", split, prefer)
    judged: dict[str, dict[int, float]] = {}
    rows = read_qrels(qrels_path)
    for qid, did, score, n in rows:
        if did not in doc_index:
            raise UserError(f"{qrels_path}:{n} names document '{did}', which is not in corpus.jsonl; "
                            "remove the line or add the document")
        if qid not in qtext:
            raise UserError(f"{qrels_path}:{n} names query '{qid}', which is not in queries.jsonl; "
                            "remove the line or add the query")
        judged.setdefault(qid, {})[doc_index[did]] = score
    if not judged:
        raise UserError(f"{qrels_path} holds no judgments; give lines 'query-id<TAB>corpus-id<TAB>score'")
    query_ids, queries, relevant, dropped = [], [], [], 0
    for qid in qtext:  # the order of queries.jsonl
        if qid not in judged:
            continue
        rel = {d: s for d, s in judged[qid].items() if s > 0}
        if not rel:
            dropped += 1
            continue
        if not qtext[qid]:
            raise UserError(f"{root / 'queries.jsonl'}:{qline[qid]}: query '{qid}' has an empty \"text\"; "
                            "remove it (and its qrels) or give it text")
        query_ids.append(qid)
        queries.append(qtext[qid])
        relevant.append(rel)
    if not queries:
        raise UserError(f"{qrels_path} judges no document relevant (score > 0) to any query; nothing to evaluate")
    return Collection(ids, titles, texts, query_ids, queries, relevant, [[] for _ in queries], source=str(root),
                      split=qrels_path.stem, judgments=len(rows), dropped_queries=dropped)


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """JSONL rows {"query": str, "passage": str, optional "negatives": [str, ...]}; UserError per bad line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pairs file '{path}' does not exist; pass a JSONL file of {{\"query\", \"passage\"}} rows "
                        "(`mmscale data synth` writes one)")
    rows = []
    for n, row in _jsonl(p, "{\"query\", \"passage\"}"):
        for name in ("query", "passage"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise UserError(f"{path}:{n} has no non-empty string field \"{name}\"; every line needs "
                                "\"query\" and \"passage\"")
        negs = row.get("negatives", [])
        if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
            raise UserError(f"{path}:{n}: \"negatives\" must be a list of strings")
        rows.append({"query": row["query"], "passage": row["passage"], "negatives": negs})
    if len(rows) < 2:
        raise UserError(f"pairs file '{path}' holds {len(rows)} pair(s); retrieval needs at least 2")
    return rows


def collection_from_pairs(rows: list[dict], source: str = "") -> Collection:
    """Pairs -> a collection: identical passages (and negatives) are one document, identical queries one query."""
    doc_of: dict[str, int] = {}
    texts: list[str] = []

    def doc(text: str) -> int:
        text = text.strip()
        if text not in doc_of:
            doc_of[text] = len(texts)
            texts.append(text)
        return doc_of[text]

    query_of: dict[str, int] = {}
    queries, relevant, negatives = [], [], []
    for r in rows:
        q = r["query"].strip()
        if q not in query_of:
            query_of[q] = len(queries)
            queries.append(q)
            relevant.append({})
            negatives.append([])
        qi = query_of[q]
        relevant[qi][doc(r["passage"])] = 1.0
        negatives[qi].extend(doc(x) for x in r.get("negatives", []) if x.strip())
    negatives = [list(dict.fromkeys(d for d in negs if d not in rel)) for negs, rel in zip(negatives, relevant)]
    return Collection([f"d{i + 1}" for i in range(len(texts))], [""] * len(texts), texts,
                      [f"q{i + 1}" for i in range(len(queries))], queries, relevant, negatives, source=source,
                      split="pairs", judgments=sum(len(r) for r in relevant))


def load_collection(path: str | os.PathLike, split: str | None = None, prefer: str = "test") -> Collection:
    """A BEIR-layout directory or a pairs JSONL file."""
    p = Path(path)
    if p.is_dir():
        return load_beir(p, split, prefer)
    if not p.exists():
        raise UserError(f"collection '{path}' does not exist; give {LAYOUT_HINT}")
    if split:
        raise UserError(f"--split {split} applies to a BEIR-layout directory, not to the pairs file '{path}'")
    return collection_from_pairs(read_pairs(p), source=str(p))
