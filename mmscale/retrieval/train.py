"""`mmscale retrieval train`: the pre-training loop (mmscale.run.train.train) with a retrieval model factory
(the export with its forward replaced by InfoNCE, loss.py) and data factory (PairGroups over the collection,
with mined or corpus-made pairs), so every engine, checkpoint, resume and metric works unchanged."""
from __future__ import annotations

import math
from pathlib import Path

from mmscale.config import ModelConfig, build_section
from mmscale.errors import UserError
from mmscale.export.format import load_export_config, load_export_state
from mmscale.models import build_model
from mmscale.retrieval.bm25 import load_bm25s
from mmscale.retrieval.collection import Collection, load_collection
from mmscale.retrieval.corpus import doc_sequences, export_tokenizer, mine_negatives, query_sequences, truncation_note
from mmscale.retrieval.embedder import idf_weights, tokenize_texts_or_empty
from mmscale.retrieval.loss import install_retrieval_loss
from mmscale.retrieval.pairs import CorpusPairs, PairGroups, is_corpus_pairs, parse_corpus_pairs
from mmscale.retrieval.stats import LAST_STATS, RetrievalStats
from mmscale.run.train import train


def retrieval_model_factory(cfg):
    model = build_model(cfg.model)
    model.load_state_dict(load_export_state(cfg.train.init_from, cfg.model), strict=True)
    if not cfg.model.tie_embeddings:
        # the head is not part of the embedder: frozen, it stays the pre-trained one in the export
        model.lm_head.weight.requires_grad_(False)
    stats = RetrievalStats()
    LAST_STATS[:] = [stats]  # the data factory's loader reads it on log steps (PairGroups.log_metrics)
    weights = None
    if cfg.retrieval.position == "idf":   # the training corpus's inverse document frequencies
        coll = train_collection(cfg.retrieval)
        weights = idf_weights(tokenize_texts_or_empty(export_tokenizer(cfg.train.init_from), coll.doc_texts()),
                              cfg.model.vocab_size)
    install_retrieval_loss(model, cfg.retrieval, stats, weights)
    return model


def train_collection(rcfg) -> Collection:
    path = rcfg.collection if (rcfg.collection or is_corpus_pairs(rcfg.pairs)) else rcfg.pairs
    return load_collection(path, rcfg.split or None, prefer="train")


def hard_per_group(rcfg) -> int:
    return rcfg.hard_negatives if rcfg.hard_negatives > 0 else math.ceil((rcfg.group_size - 2) / 2)


def retrieval_data_factory(cfg, info, micro_batch_size: int):
    r = cfg.retrieval
    sp = export_tokenizer(cfg.train.init_from)
    coll = train_collection(r)
    n_ctx = cfg.model.n_ctx
    queries, q_cut = query_sequences(sp, coll, n_ctx)
    mode = "first_window" if r.passage_mode == "max_chunk" else r.passage_mode
    docs, _, d_cut = doc_sequences(sp, coll, n_ctx, mode)
    if info.rank == 0:
        print(f"retrieval: {coll.summary()} ({coll.source}, split {coll.split}); "
              + truncation_note(d_cut, coll.n_docs, q_cut, n_ctx, mode)
              + ("; training embeds the first window (max_chunk applies to eval and mining)"
                 if r.passage_mode == "max_chunk" else ""), flush=True)
    negatives = [list(n) for n in coll.negatives]
    per_group = None
    if r.negatives != "random":
        cache = r.cache_dir or str(Path(cfg.run.dir) / "retrieval_cache")
        mined = mine_negatives(r.negatives, coll, depth=r.mine_depth, export=cfg.train.init_from,
                               mode=r.passage_mode, position=r.position, cache_dir=cache,
                               progress=info.rank == 0 and cfg.log.progress)
        negatives = [list(dict.fromkeys(g + m)) for g, m in zip(negatives, mined)]
        per_group = hard_per_group(r)
    pairs = [(qi, d) for qi, rel in enumerate(coll.relevant) for d in sorted(rel)]
    views = None
    if is_corpus_pairs(r.pairs):
        modes, judged = parse_corpus_pairs(r.pairs)
        views = CorpusPairs.from_collection(sp, coll, n_ctx, cfg.run.seed)
        made = {m: len(views.eligible(m)) for m in modes}
        if not sum(made.values()):
            raise UserError(f"--pairs {r.pairs}: no document of '{coll.source}' makes a pair of this kind "
                            f"({', '.join(f'{m}: 0' for m in modes)}); choose another mode")
        pairs = (pairs if judged else []) + views.items(modes)
        if info.rank == 0:
            print("retrieval: pairs per epoch: " + ", ".join(f"{m} {k}" for m, k in made.items())
                  + (f", judged {sum(len(x) for x in coll.relevant)}" if judged else " (judged queries not used)"),
                  flush=True)
    loader = PairGroups(queries, docs, negatives, group_size=r.group_size, micro_batch=micro_batch_size,
                        n_ctx=n_ctx, seed=cfg.run.seed, rank=info.rank, world=info.world_size, pad_id=sp.pad_id(),
                        pairs=pairs, excluded=coll.excluded(near=True), hard_per_group=per_group, gather=r.gather_negatives,
                        views=views)
    return loader, None



def prepare_config(cfg, init: str | None, pairs: str | None, collection: str | None = None,
                   split: str | None = None, negatives: str | None = None):
    """Fill train.init_from / retrieval.pairs|collection and take the model config from the export."""
    if init:
        cfg.train.init_from = init
    if pairs:
        cfg.retrieval.pairs = pairs
    if collection:
        cfg.retrieval.collection = collection
    if split:
        cfg.retrieval.split = split
    if negatives:
        cfg.retrieval.negatives = negatives
    if not cfg.train.init_from:
        raise UserError("retrieval training starts from an export: pass --init EXPORT (or train.init_from=EXPORT)")
    if not cfg.retrieval.pairs and not cfg.retrieval.collection:
        raise UserError("no training data: pass --collection DIR (BEIR layout) or --pairs PAIRS.jsonl")
    if is_corpus_pairs(cfg.retrieval.pairs):
        parse_corpus_pairs(cfg.retrieval.pairs)
        if not cfg.retrieval.collection:
            raise UserError(f"--pairs {cfg.retrieval.pairs} makes pairs from a collection's corpus: pass --collection DIR too")
    elif cfg.retrieval.pairs and cfg.retrieval.collection:
        raise UserError("pass either --pairs or --collection (retrieval.pairs or retrieval.collection), not both "
                        "(or --pairs corpus:MODE with --collection: pairs made from its corpus)")
    meta = load_export_config(cfg.train.init_from)
    cfg.model = build_section(ModelConfig, meta["model"], "model")
    coll = train_collection(cfg.retrieval)  # bad data fails before any process group starts
    most = max(len(e) for e in coll.excluded(near=True))
    if cfg.retrieval.group_size > 2 and coll.n_docs - most < cfg.retrieval.group_size - 2:
        raise UserError(f"retrieval.group_size is {cfg.retrieval.group_size} but a query of "
                        f"'{coll.source}' has only {coll.n_docs - most} documents that are not relevant to it; "
                        f"set retrieval.group_size <= {coll.n_docs - most + 2} or add documents")
    if cfg.retrieval.negatives == "bm25":
        load_bm25s()  # a missing package fails here, before any process group starts
    return cfg


def train_retrieval(cfg) -> int:
    return train(cfg, model_factory=retrieval_model_factory, data_factory=retrieval_data_factory)
