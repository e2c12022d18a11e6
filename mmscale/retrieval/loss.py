"""The retrieval loss: InfoNCE over groups [query, positive, negatives] of pooled embeddings, the bit-packed
mask of candidates that are no negatives, and the model's `forward` replaced by it (install_retrieval_loss;
see the package docstring)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmscale.retrieval.embedder import parse_position, pooled_embeddings
from mmscale.retrieval.stats import RetrievalStats


def pack_mask(mask) -> "torch.Tensor":
    """bool [B, C] -> Long[B * ceil(C / 32)]: 32 bits per word."""
    B, C = mask.shape
    words = (C + 31) // 32
    padded = torch.zeros(B, words * 32, dtype=torch.long)
    padded[:, :C] = torch.as_tensor(mask, dtype=torch.long)
    shifts = torch.arange(32, dtype=torch.long)
    return (padded.view(B, words, 32) << shifts).sum(-1).reshape(-1)


def unpack_mask(words, rows: int, cols: int):
    """The inverse of pack_mask: bool [rows, cols]."""
    w = words.view(rows, -1)
    shifts = torch.arange(32, dtype=torch.long, device=words.device)
    bits = (w.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, -1)[:, :cols].bool()

def info_nce(emb, group_size: int, temperature: float, gather: bool = False, mask=None, stats=None):
    """Mean InfoNCE loss of normalised embeddings [B*G, d] laid out as groups [query, positive, negatives].

    Without `gather` each query scores its own group's G - 1 candidates; with it, the candidates of
    every group on every rank (other ranks' embeddings without gradient). `mask` (bool [B, C], or the
    packed words of pairs.PairGroups) marks candidates that are relevant to the query: left out of its softmax.
    `stats` (a RetrievalStats) collects batch_stats of the step (no gradient).
    """
    d = emb.shape[-1]
    groups = emb.view(-1, group_size, d)
    B = groups.shape[0]
    queries, cands = groups[:, 0], groups[:, 1:]
    if not gather:
        logits = torch.einsum("bd,bkd->bk", queries, cands) / temperature
        target = torch.zeros(B, dtype=torch.long, device=emb.device)
    else:
        flat = cands.reshape(-1, d)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if world > 1:
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat.detach().contiguous())
            parts[rank] = flat  # this rank's candidates keep their gradient
            flat = torch.cat(parts)
        logits = queries @ flat.T / temperature
        target = (rank * B + torch.arange(B, device=emb.device)) * (group_size - 1)
    logits = logits.float()
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = unpack_mask(mask, B, logits.shape[1])
        logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
    loss = F.cross_entropy(logits, target)
    if stats is not None:
        stats.add(batch_stats(queries.detach(), cands.detach(), logits.detach(), target))
    return loss


def batch_stats(queries, cands, logits, target) -> dict:
    """What a step's embeddings look like (all float sums over the micro-batch, with their counts):

    acc: in-batch accuracy, the positive scored above every other unmasked candidate (a tie with k others
    counts 1/(k+1)); chance: 1 / the number of unmasked candidates; cos: mean pairwise cosine of the
    documents (positives and negatives) of the batch; align: mean squared distance of query and positive
    (Wang & Isola 2020, alpha 2); unif: log of the mean exp(-2 * squared distance) over pairs of documents.
    Collapse shows as cos -> 1, unif -> 0, acc -> chance."""
    B, d = queries.shape[0], queries.shape[-1]
    pos = logits.gather(1, target[:, None])
    live = torch.isfinite(logits)
    greater = ((logits > pos) & live).sum(1).float()
    ties = ((logits == pos) & live).sum(1).float() - 1
    acc = ((greater == 0).float() / (1 + ties)).sum()
    chance = (1.0 / live.sum(1).float()).sum()
    docs = cands.reshape(-1, d).float()
    n = docs.shape[0]
    sim = docs @ docs.T
    off = ~torch.eye(n, dtype=torch.bool, device=docs.device)
    cos = sim[off].mean() if n > 1 else sim.new_tensor(1.0)
    unif = torch.log(torch.exp(-4.0 + 4.0 * sim[off]).mean()) if n > 1 else sim.new_tensor(0.0)
    align = (2.0 - 2.0 * (queries.float() * cands[:, 0].float()).sum(-1)).sum()
    return {"acc": float(acc), "chance": float(chance), "queries": B, "cos": float(cos), "unif": float(unif),
            "align": float(align), "batches": 1}


def install_retrieval_loss(model, rcfg, stats: RetrievalStats | None = None, weights=None) -> None:
    """Replace `model.forward` (on the instance) by the InfoNCE loss; see the module docstring."""
    position = parse_position(rcfg.position)
    lm_forward = model.forward

    def forward(input_ids, labels=None):
        if labels is None or labels.dim() != 1:
            return lm_forward(input_ids, labels)
        n = input_ids.shape[0]
        emb = pooled_embeddings(model, input_ids, labels[:n], position, weights)
        mask = labels[n:] if labels.shape[0] > n else None
        return info_nce(emb, rcfg.group_size, rcfg.temperature, rcfg.gather_negatives, mask,
                        stats if model.training else None)

    model.forward = forward
