"""Near-duplicate documents: never each other's training negatives (Collection.duplicate_sets)."""
from __future__ import annotations

import hashlib
import re

import numpy as np

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
