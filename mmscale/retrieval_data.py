"""Retrieval collections: a corpus, queries and relevance judgments, in the BEIR layout.

    DIR/corpus.jsonl     {"_id": "d1", "title": "...", "text": "..."}      one document a line
    DIR/queries.jsonl    {"_id": "q1", "text": "..."}
    DIR/qrels/SPLIT.tsv  query-id <TAB> corpus-id <TAB> score               (a header line is allowed)

A score > 0 is relevant (graded: the score is the gain of nDCG); 0 or less is judged not relevant.
Only the queries with at least one relevant judgment in the split are evaluated or trained on.

A pairs file (JSONL {"query", "passage"[, "negatives"]}) is a collection too: every pair is a query
with one relevant passage; identical passages become one document and identical queries one query
(so two pairs that share a passage do not make it its own distractor).

`mmscale retrieval import` writes the layout from raw files: a pairs JSONL, or a classic SMART-style
collection (records `.I id`, fields `.T` title, `.W` text, others ignored) with a qrels file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmscale.errors import UserError, utf8_problem

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
# near-duplicate documents (never each other's negatives)

NEAR_DUP_JACCARD = 0.8     # Jaccard similarity of word 3-shingle sets from which two documents are near-duplicates
SHINGLE_WORDS = 3
_MINHASH_BANDS, _MINHASH_ROWS = 16, 4   # 64 MinHash values; a pair at Jaccard 0.8 is a candidate with p > 0.9997
_MERSENNE = (1 << 31) - 1


def shingles(text: str, k: int = SHINGLE_WORDS) -> set[str]:
    """The set of k-word shingles of a text (lower-cased words; a text of fewer than k words is one shingle)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) <= k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(texts, threshold: float = NEAR_DUP_JACCARD) -> list[set[int]]:
    """Per text: the indices of the texts whose word 3-shingle sets have Jaccard similarity >= threshold with it
    (itself included; identical texts always; texts without words only match each other). Candidates come from
    MinHash locality-sensitive hashing (16 bands of 4 of 64 hashes; a pair at Jaccard 0.8 is missed with
    probability < 3e-4, at 0.9 < 1e-9), and every reported pair is checked by its exact Jaccard, so none is
    reported below the threshold. Deterministic (hashes from blake2b, not Python's salted hash)."""
    n = len(texts)
    out = [{i} for i in range(n)]
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    for group in by_text.values():
        for i in group:
            out[i].update(group)
    reps = [g[0] for g in by_text.values()]          # one text of each distinct content
    sh = {i: shingles(texts[i]) for i in reps}
    rng = np.random.default_rng(0x5eed)
    nh = _MINHASH_BANDS * _MINHASH_ROWS
    a = rng.integers(1, _MERSENNE, size=nh, dtype=np.uint64)[None]
    b = rng.integers(0, _MERSENNE, size=nh, dtype=np.uint64)[None]
    buckets: dict[tuple, list[int]] = {}
    for i in reps:
        if not sh[i]:
            continue
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") % _MERSENNE
                      for s in sh[i]], dtype=np.uint64)[:, None]
        sig = ((x * a + b) % _MERSENNE).min(0).tolist()    # (x a + b) mod p < 2^62: no uint64 overflow
        for band in range(_MINHASH_BANDS):
            key = (band, *sig[band * _MINHASH_ROWS:(band + 1) * _MINHASH_ROWS])
            buckets.setdefault(key, []).append(i)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for u in range(len(members)):
            for v in range(u + 1, len(members)):
                i, j = members[u], members[v]
                if (i, j) in checked:
                    continue
                checked.add((i, j))
                if jaccard(sh[i], sh[j]) >= threshold:
                    gi, gj = by_text[texts[i]], by_text[texts[j]]
                    for x in gi:
                        out[x].update(gj)
                    for x in gj:
                        out[x].update(gi)
    return out


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


# ---------------------------------------------------------------------------------------------
# writing and importing

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def split_qrels(qrels: list[tuple[str, str, float]], split: str, test_fraction: float, seed: int) -> dict:
    """{split: qrels}, or {"train": ..., "test": ...} with a seeded test_fraction of the queries held out."""
    if test_fraction <= 0:
        return {split: qrels}
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    qids = list(dict.fromkeys(q for q, _, _ in qrels))
    n_test = max(1, round(len(qids) * test_fraction))
    if n_test >= len(qids):
        raise UserError(f"--test-fraction {test_fraction} leaves no training query of {len(qids)}; lower it")
    order = np.random.default_rng(seed).permutation(len(qids))
    test = {qids[i] for i in order[:n_test]}
    return {"train": [r for r in qrels if r[0] not in test], "test": [r for r in qrels if r[0] in test]}


def write_beir(out: str | os.PathLike, doc_ids, titles, texts, queries: dict[str, str],
               qrels: list[tuple[str, str, float]] | dict, split: str = "test", overwrite: bool = False) -> Path:
    """Write the layout; `qrels` is one split's lines, or {split: lines}."""
    root = Path(out)
    if (root / "corpus.jsonl").exists() and not overwrite:
        raise UserError(f"'{root}' already holds a collection; pass --overwrite or another --out")
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    # corpus.jsonl is what makes the folder a collection: removed first and written last, so an interrupted
    # (over)write never leaves a collection that looks complete (a new corpus beside old qrels, or no qrels)
    (root / "corpus.jsonl").unlink(missing_ok=True)
    _write_atomic(root / "queries.jsonl", "".join(json.dumps({"_id": i, "text": x}, ensure_ascii=False) + "\n"
                                                  for i, x in queries.items()))

    def fmt(s: float) -> str:
        return str(int(s)) if float(s).is_integer() else repr(float(s))

    for name, lines in (qrels if isinstance(qrels, dict) else {split: qrels}).items():
        _write_atomic(root / "qrels" / f"{name}.tsv",
                      "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{fmt(s)}\n" for q, d, s in lines))
    _write_atomic(root / "corpus.jsonl", "".join(json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=False) + "\n"
                                                 for i, t, x in zip(doc_ids, titles, texts)))
    return root


def read_smart(path: str | os.PathLike, kind: str) -> list[tuple[str, str, str]]:
    """Records of a SMART-style file: [(id, title, text)] from `.I id`, `.T` title and `.W` text fields."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{kind} file '{path}' does not exist")
    from mmscale.errors import check_text_file

    check_text_file(p, f"{kind} file")  # refused, not decoded with U+FFFD (a Latin-1 collection: iconv it first)
    records, cur, fieldname = [], None, None
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = re.match(r"^\.([A-Z])\b\s*(.*)$", line.rstrip("\n"))
            if m:
                tag, rest = m.group(1), m.group(2)
                if tag == "I":
                    if not rest.strip():
                        raise UserError(f"{path}:{n}: '.I' without an id; records start with '.I ID'")
                    cur = {"id": rest.strip().split()[0], "T": [], "W": [], "line": n}
                    records.append(cur)
                    fieldname = None
                elif cur is None:
                    raise UserError(f"{path}:{n}: field '.{tag}' before the first '.I ID' record")
                else:
                    fieldname = tag
                    if rest.strip() and tag in ("T", "W"):
                        cur[tag].append(rest.strip())
                continue
            if cur is not None and fieldname in ("T", "W") and line.strip():
                cur[fieldname].append(line.strip())
    if not records:
        raise UserError(f"{kind} file '{path}' holds no '.I ID' records; is it a SMART-style (.I/.T/.W) file?")
    out, seen = [], {}
    for r in records:
        if r["id"] in seen:
            raise UserError(f"{path}:{r['line']}: duplicate id '.I {r['id']}' (first on line {seen[r['id']]})")
        seen[r["id"]] = r["line"]
        out.append((r["id"], " ".join(r["T"]), " ".join(r["W"])))
    return out


def read_raw_qrels(path: str | os.PathLike, fmt: str = "auto") -> list[tuple[str, str, float]]:
    """Raw relevance files: 'q d' (relevant), 'q d score', TREC 'q 0 d score', or CISI-style 'q d 0 0.0'."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"qrels file '{path}' does not exist")
    from mmscale.errors import check_text_file

    check_text_file(p, "qrels file")
    with open(p, encoding="utf-8") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    if lines and lines[0][1][0].lower() in ("query-id", "query_id", "qid"):
        lines = lines[1:]
    if not lines:
        raise UserError(f"qrels file '{path}' is empty")
    widths = {len(parts) for _, parts in lines}
    if len(widths) != 1:
        raise UserError(f"qrels file '{path}' mixes lines of {sorted(widths)} columns; give one format")
    width = widths.pop()
    if fmt == "auto":
        if width in (2, 3):
            fmt = {2: "pair", 3: "score"}[width]
        elif width == 4 and all(parts[2] == "0" and _is_zero(parts[3]) for _, parts in lines):
            fmt = "pair-00"
        elif width == 4 and all(parts[1] == "0" for _, parts in lines):
            fmt = "trec"
        else:
            raise UserError(f"cannot tell the format of qrels file '{path}' ({width} columns); pass "
                            "--qrels-format pair|score|trec|pair-00")
    need = {"pair": 2, "score": 3, "trec": 4, "pair-00": 4}[fmt]
    if width != need:
        raise UserError(f"qrels file '{path}' has {width} columns; --qrels-format {fmt} needs {need}")
    out = []
    for n, parts in lines:
        if fmt == "trec":
            q, d, s = parts[0], parts[2], parts[3]
        elif fmt == "score":
            q, d, s = parts
        else:
            q, d, s = parts[0], parts[1], "1"
        try:
            out.append((q, d, float(s)))
        except ValueError:
            raise UserError(f"{path}:{n}: score {s!r} is not a number") from None
    return out


def _is_zero(s: str) -> bool:
    try:
        return float(s) == 0.0
    except ValueError:
        return False


def parse_relevance_map(spec: str) -> dict[float, float]:
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            raw, grade = item.split(":")
            out[float(raw)] = float(grade)
        except ValueError:
            raise UserError(f"--relevance-map must look like '1:4,2:3,3:2,4:1,5:0', got {spec!r}") from None
    return out


def import_collection(args: argparse.Namespace) -> dict:
    """`mmscale retrieval import`: raw files -> the BEIR layout under args.out; returns counts."""
    from mmscale.cli.conventions import check_output_path

    inputs = [getattr(args, k, None) for k in ("pairs", "docs", "queries", "qrels")]
    # an existing folder is written into (refused below only when it holds a collection, without --overwrite)
    check_output_path(args.out, "--out", overwrite=True, inputs=inputs)
    if (Path(args.out) / "corpus.jsonl").exists() and not args.overwrite:
        raise UserError(f"'{args.out}' already holds a collection; pass --overwrite or another --out")
    if args.format == "pairs":
        if not args.pairs:
            raise UserError("--format pairs needs --pairs FILE.jsonl")
        c = collection_from_pairs(read_pairs(args.pairs), source=args.pairs)
        qrels = [(c.query_ids[q], c.doc_ids[d], s) for q, rel in enumerate(c.relevant) for d, s in rel.items()]
        splits = split_qrels(qrels, args.split, args.test_fraction, args.seed)
        write_beir(args.out, c.doc_ids, c.titles, c.texts, dict(zip(c.query_ids, c.queries)), splits, args.split,
                   args.overwrite)
        return {"documents": c.n_docs, "queries": len(c.queries), "judgments": len(qrels),
                "splits": {k: len({q for q, _, _ in v}) for k, v in splits.items()}}
    for name in ("docs", "queries", "qrels"):
        if not getattr(args, name):
            raise UserError(f"--format smart needs --docs, --queries and --qrels; --{name} is missing")
    docs = read_smart(args.docs, "documents")
    queries = read_smart(args.queries, "queries")
    if args.query_ids == "order":
        queries = [(str(i + 1), t, x) for i, (_, t, x) in enumerate(queries)]
    doc_ids = [d for d, _, _ in docs]
    # records without .T or .W are kept as empty documents (they may be judged relevant), and counted
    empty = sum(1 for _, t, x in docs if not t and not x)
    qmap = {}
    for q, t, x in queries:
        text = " ".join(s for s in (t, x) if s)
        if not text:
            raise UserError(f"{args.queries}: query '.I {q}' has no .W (or .T) text; remove it or give it text")
        qmap[q] = text
    grades = parse_relevance_map(args.relevance_map) if args.relevance_map else None
    known_docs = set(doc_ids)
    qrels = []
    for q, d, s in read_raw_qrels(args.qrels, args.qrels_format):
        if q not in qmap:
            hint = (" (Cranfield-style qrels number queries 1..n in file order: pass --query-ids order)"
                    if args.query_ids == "record" else "")
            raise UserError(f"{args.qrels} names query '{q}', which is not in {args.queries}{hint}")
        if d not in known_docs:
            raise UserError(f"{args.qrels} names document '{d}', which is not in {args.docs}; fix the id or "
                            "remove the line")
        if grades is not None:
            if s not in grades:
                raise UserError(f"{args.qrels}: score {s:g} is not in --relevance-map {args.relevance_map}")
            s = grades[s]
        qrels.append((q, d, s))
    splits = split_qrels(qrels, args.split, args.test_fraction, args.seed)
    write_beir(args.out, doc_ids, [t for _, t, _ in docs], [x for _, _, x in docs], qmap, splits, args.split,
               args.overwrite)
    return {"documents": len(docs), "queries": len(qmap), "judgments": len(qrels), "empty_documents": empty,
            "splits": {k: len({q for q, _, _ in v}) for k, v in splits.items()}}


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["pairs", "smart"], required=True,
                   help="pairs: a JSONL of {\"query\", \"passage\"}; smart: .I/.T/.W files with a qrels file")
    p.add_argument("--out", required=True, help="the collection directory to write (BEIR layout)")
    p.add_argument("--pairs", help="--format pairs: the JSONL file")
    p.add_argument("--docs", help="--format smart: the documents file (e.g. CISI.ALL, cran.all.1400)")
    p.add_argument("--queries", help="--format smart: the queries file (e.g. CISI.QRY, cran.qry)")
    p.add_argument("--qrels", help="--format smart: relevance file (e.g. CISI.REL, cranqrel)")
    p.add_argument("--qrels-format", default="auto", choices=["auto", "pair", "score", "trec", "pair-00"],
                   help="pair: 'q d'; score: 'q d grade'; trec: 'q 0 d grade'; pair-00: 'q d 0 0.0' (CISI); "
                        "auto tells them apart")
    p.add_argument("--query-ids", default="record", choices=["record", "order"],
                   help="record: the '.I' numbers; order: 1..n in file order (what Cranfield's qrels use)")
    p.add_argument("--relevance-map", default="",
                   help="raw score -> grade, e.g. '1:4,2:3,3:2,4:1,5:0,-1:0' (Cranfield: 1 is the most relevant)")
    p.add_argument("--split", default="test", help="the qrels file name: qrels/SPLIT.tsv (default test)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction of the judged queries: writes qrels/train.tsv and qrels/test.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction split")
    p.add_argument("--overwrite", action="store_true")
