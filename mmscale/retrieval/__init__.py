"""Retrieval fine-tuning (InfoNCE) and evaluation on whole collections: `mmscale retrieval train|eval|import`.

    mmscale retrieval import --format smart --docs CISI.ALL --queries CISI.QRY --qrels CISI.REL --out cisi
    mmscale retrieval train --init exports/mixer --collection cisi --split train --negatives bm25 run.dir=runs/ret
    torchrun --standalone --nproc_per_node 2 -m mmscale.cli retrieval train --init ... engine.kind=fsdp
    mmscale convert runs/ret exports/mixer-retrieval
    mmscale retrieval eval exports/mixer-retrieval --collection cisi --candidates 32,128

A collection is a BEIR-layout directory or a pairs JSONL (collection.py); `--pairs corpus:MODE...`
with a collection trains on pairs made from its corpus (pairs.CorpusPairs: title -> body, crop -> window, sentence ->
rest), optionally mixed with its judged queries. The paper's method (Badger 2024, v2+): the generative model
without its LM head embeds a text by its hidden state at one token (embedder.py); here the default is the
mean over the text's tokens (retrieval.position mean: last-token embeddings of small models made InfoNCE
collapse, docs/retrieval-collapse.md), and every log step records in-batch accuracy, alignment, uniformity
and the batch's document cosine, with a warning on collapse (stats.RetrievalStats). Training uses InfoNCE on cosine similarity with temperature tau: each
example is a group of 1 query, one of its relevant documents and group_size - 2 negatives (the
query's given or mined hard negatives first, then random documents). A document judged relevant to
the query (or an exact or near duplicate of one: word 3-shingle Jaccard >= 0.8,
neardup.near_duplicates) is never its negative: not in its group, and, with
retrieval.gather_negatives (every query also scores the candidates of all other groups on all ranks,
gathered without gradient), masked out of the gathered candidates. A pair made from the corpus counts as
its document: with several corpus modes (corpus:crop+ict) two items of one document (or of duplicates)
in one gathered batch are never each other's negatives, and neither is a corpus view of a relevant document.

Training is the pre-training loop (mmscale.run.train.train) with a retrieval model and data factory,
so every engine, checkpoints, resume, signals and metrics work unchanged: the model's `forward`
is replaced on the instance by the InfoNCE loss (parameter names, hence checkpoints and
`mmscale convert`, are those of the language model), and a batch is {"input_ids": Long[B*G, n_ctx]
(right-padded groups), "labels": Long[B*G + words]}: the number of real tokens of each sequence,
then the bit-packed mask [B, candidates] of candidates that must not count as negatives.

Evaluation ranks every document of the corpus for every query (metrics.py): nDCG@10,
Recall@10/100, MRR@10, MAP, and the paper's top-1 among n, beside a BM25 row on the same queries,
corpus and candidates (bm25.py) and a hybrid row (BM25 and model scores interpolated with a weight
chosen on another split's queries, or reciprocal-rank fusion), with paired per-query comparisons. Corpus embeddings are cached, keyed by the export's files, the
corpus, the passage mode and the embedding position.

Long documents (retrieval.passage_mode): `truncate` embeds the first n_ctx tokens of title + text;
`first_window` the first window of the max_chunk split (the title, then the text's first tokens);
`max_chunk` splits the text into windows of n_ctx tokens, each starting with the title, and scores a
document by its best window. Training always embeds the first window (truncate or first_window);
both say how many documents were longer than the window.

The modules (each imports only modules above it in this list; __init__ imports none):
  neardup.py     word-shingle near-duplicate documents (MinHash LSH, exact Jaccard check)
  collection.py  Collection: BEIR-layout directories and pairs JSONL files, read and checked
  importer.py    `mmscale retrieval import`: raw files (pairs JSONL, SMART .I/.T/.W + qrels) -> the BEIR layout
  metrics.py     nDCG / Recall / MRR / MAP with fair ties, top-1 among n, RRF and interpolation, top k
  bm25.py        the lexical baseline (bm25s)
  embedder.py    mmscale.Embedder and the pooling that training shares with it
  stats.py       per-step retrieval statistics and the collapse rule (plain Python, shared with report.py)
  report.py      the retrieval section of `mmscale report`
  loss.py        InfoNCE on pooled embeddings, the packed negative mask, the model's replaced forward
  pairs.py       PairGroups (the training loader) and CorpusPairs (pairs made from the corpus itself)
  corpus.py      token sequences of documents and queries, the corpus-embedding cache, mined hard negatives
  train.py       `retrieval train`: the model and data factories of the pre-training loop
  evaluate.py    `retrieval eval`: whole-corpus metrics beside BM25 and the hybrid, the printed table
  cli.py         the command's arguments and dispatch
"""
