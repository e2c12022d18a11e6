"""`mmscale plan`: what a config needs on N GPUs, per engine and layout, before anyone books them.

    mmscale plan --config configs/tinystories-mixer.yaml --gpus 8 --device h100
    mmscale plan --config X model.d_model=2048 --gpus 8 --nodes 8 --device h100 --interconnect ib-400 --json
    mmscale plan --config configs/tiny.yaml --gpus 2 --device cpu        # memory = this host's

For every layout the world allows (single, ddp, DeepSpeed ZeRO-1/2/3, FSDP2, HSDP) it counts, per rank:
  params       parameters the rank holds between steps (fp32 master weights, mmscale's precision policy)
  grads        gradients (fp32; full or the rank's partition)
  optimizer    AdamW moments (+ DeepSpeed's fp32 master partition: its module keeps fp32 weights as well)
  activations  tensors saved for backward by one micro-batch, counted from the model's own shapes (mixer and
               transformer differ: see _block_saved_bytes); with activation checkpointing only block inputs
               plus one block recomputed; plus the loss's logits (whole, or one chunk of the chunked loss)
  buffers      bf16 weight copies (autocast / FSDP2's gathered blocks), gathered ZeRO-3 parameters,
               gradient reduce buckets, and the runtime itself (CUDA context, or on the CPU torch's own RSS)
and compares the total with the device's memory less a margin (default 10%). Step time is the model's
training FLOPs per token (model-info's causal count: live FLOPs) at an MFU, plus the communication of each
layout over the interconnect, partly hidden behind compute (see step_time). The model is built on the
meta device: sizing a 1B-parameter config allocates nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.utils.checkpoint import checkpoint

from mmscale import precision as prec
from mmscale.config import load_config
from mmscale.errors import UserError
from mmscale.model_info import model_info
from mmscale.models import build_model
from mmscale.ops.cross_entropy import CHUNK_ELEMENTS, CHUNKED_MIN_LOGITS, CUDA_CHUNK_ELEMENTS
from mmscale.peak_flops import lookup

GiB = 2 ** 30

# Memory per device (bytes the framework sees: torch.cuda.get_device_properties().total_memory) and the
# peak FLOP/s row of mmscale/peak_flops.py it uses. "cpu": this host's memory, shared by its ranks.
DEVICES = {
    "h100": {"capability": (9, 0), "label": "NVIDIA H100 SXM 80 GB", "memory": 85_045_592_064, "peak_name": "H100 SXM",
             "intra": "nvlink"},
    "h200": {"capability": (9, 0), "label": "NVIDIA H200 SXM 141 GB", "memory": 150_754_820_096, "peak_name": "H200",
             "intra": "nvlink"},
    "a100": {"capability": (8, 0), "label": "NVIDIA A100 SXM4 80 GB", "memory": 85_100_068_864, "peak_name": "A100",
             "intra": "nvlink-a100"},
    "a100-40": {"capability": (8, 0), "label": "NVIDIA A100 SXM4 40 GB", "memory": 42_505_273_344, "peak_name": "A100",
                "intra": "nvlink-a100"},
    "l40s": {"capability": (8, 9), "label": "NVIDIA L40S 48 GB", "memory": 47_697_362_944, "peak_name": "L40S", "intra": "pcie4"},
    "cpu": {"label": "this host's CPU", "memory": None, "peak_name": None, "intra": "shm"},
}
# Bus bandwidth one rank gets in a ring collective, bytes/s per direction (vendor figures): NVLink 4 (H100,
# H200) 900 GB/s bidirectional = 450 GB/s a direction; NVLink 3 (A100) 600 GB/s = 300; InfiniBand NDR 400 Gb/s
# = 50 GB/s per GPU with one NIC per GPU (DGX H100), HDR 200 Gb/s = 25 GB/s; RoCE/Ethernet likewise; PCIe 4/5 x16
# 32/64 GB/s; shm: gloo through shared memory on one host (order of magnitude only).
INTERCONNECTS = {
    "nvlink": 450e9, "nvlink-a100": 300e9, "ib-400": 50e9, "ib-200": 25e9, "ib-100": 12.5e9,
    "roce-200": 25e9, "eth-100": 12.5e9, "eth-25": 3.125e9, "pcie4": 32e9, "pcie5": 64e9, "shm": 5e9,
}
# MFU (live FLOPs) when benchmarks/RESULTS.md has no measured figure for the device: Llama 3 reports 38-43% BF16
# MFU on 8k-16k H100s (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 4); PaLM 46% on TPU v4. 40% is the
# middle of that range for a well-tuned dense model; the mixer's own target in RESULTS.md is 45%.
DEFAULT_MFU = 0.40
MFU_SOURCE = "assumed 40% (Llama 3 reports 38-43% BF16 MFU on H100s; no measured figure in benchmarks/RESULTS.md)"
# what the runtime holds outside the tensors counted here: CUDA context + NCCL + allocator slack (a typical
# H100 context with NCCL is 0.5-1 GiB). On the CPU: the process's resident memory before the model exists
# (torch, the engine's imports, the process group: 250-270 MiB measured) plus what the first steps add beyond the
# counted tensors (oneDNN kernels and scratch, glibc's retained free memory: 180-300 MiB), fitted to
# tools/plan_vs_measured_memory.py runs (benchmarks/RESULTS.md, "mmscale plan against measured peaks").
MiB = 2 ** 20
RUNTIME_BYTES = {"cuda": 1 * GiB, "cpu": 350 * MiB, "cpu-deepspeed": 530 * MiB, "cpu-fsdp": 450 * MiB}
# DeepSpeed ZeRO-3 on the CPU, beyond the counted tensors: 14 bytes a parameter (fitted: 12-18 measured), the
# gathered parameters it keeps for reuse (stage3_max_reuse_distance 1e9), the full-size gradients before each
# reduce-scatter, and the flat copies made while partitioning the fp32 model
ZERO3_CPU_EXTRA_PER_PARAM = 14
DS_MAX_LIVE = 1_000_000_000            # stage3_max_live_parameters / stage3_max_reuse_distance (elements)
# DeepSpeed's defaults for the buffers it allocates (mmscale's generated config does not change them)
DS_REDUCE_BUCKET = 500_000_000         # reduce_bucket_size (elements): ZeRO-1/2 ipg buffer, ZeRO-3 reduce bucket
DS_PREFETCH_BUCKET = 50_000_000        # stage3_prefetch_bucket_size (elements)
DDP_BUCKET_CAP = 25 * 2 ** 20          # bytes of DDP's gradient buckets (they copy every gradient: 4 N in all)
DEFAULT_MARGIN = 0.10
COLLECTIVE_LATENCY_S = 20e-6   # fixed cost of one NCCL collective (order of magnitude: 10-30 us on NVLink/IB)

LAYOUT_ORDER = ["single", "ddp", "zero1", "zero2", "fsdp", "hsdp", "zero3"]


def _layouts_for(world: int, nodes: int) -> list[dict]:
    out = []
    if world == 1:
        out.append({"name": "single", "engine": "single", "zero_stage": None})
    else:
        out.append({"name": "ddp", "engine": "ddp", "zero_stage": None})
    for s in (1, 2, 3):
        out.append({"name": f"ZeRO-{s}", "engine": "deepspeed", "zero_stage": s})
    out.append({"name": "FSDP2", "engine": "fsdp", "zero_stage": None, "hsdp_replicas": 1})
    if nodes > 1:
        out.append({"name": f"HSDP ({nodes} replicas x {world // nodes})", "engine": "fsdp", "zero_stage": None,
                    "hsdp_replicas": nodes})
    return out


# ----------------------------------------------------------------------------------------------
# sizes from the model itself

def model_sizes(model_cfg) -> dict:
    """Parameter counts by role (model-info's breakdown), per block, the largest block, matmul weights."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    info = model_info(model_cfg)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = info["parameters"]["total"] - block * len(model.blocks)
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    return {"total": info["parameters"]["total"], "block": block, "root": root, "matmul": matmul,
            "embedding": info["parameters"]["embedding"], "flops": info["flops_per_token"]["training"]}


def _block_saved_bytes(m, B: int, fp32: bool) -> int:
    """Bytes one block saves for backward at micro-batch B (inputs of every matmul, norm and nonlinearity).

    bf16 autocast: norms run in fp32 on the fp32 residual stream (their input and stats are saved in fp32);
    each matmul saves its own bf16 cast of its input; elementwise nonlinearities save bf16 inputs/outputs.
    """
    T, d = m.n_ctx, m.d_model
    H = m.ffn_hidden or m.ffn_mult * m.d_model
    a = 4 if fp32 else 2  # bytes of a matmul input / nonlinearity tensor
    BT = B * T
    if m.kind == "mixer":
        # LayerNorm x2: fp32 input + mean/rstd; token mixing: its input (flat) or in_proj/mixer/out_proj inputs
        mixing = a * BT * d * (3 if m.mixer == "multihead" else 1)
        # FFN: up's input, GELU's input, down's input
        return 2 * (4 * BT * d + 8 * BT) + mixing + a * BT * d + 2 * a * BT * H
    kv = (m.kv_heads or m.heads) * (d // m.heads)
    norms = 2 * (4 * BT * d + 4 * BT * d + 4 * BT)        # RMSNorm: its input, the normalised x, rsqrt
    casts = 1 if fp32 else 3                               # bf16: wq, wk, wv each save their own cast of the input
    attn_in = casts * a * BT * d
    kv_saved = d if kv != d else kv                        # GQA: SDPA sees the repeated k and v (d wide)
    sdpa = a * BT * (d + 2 * kv_saved + d) + 4 * B * m.heads * T   # q, k, v, output, logsumexp
    wo = a * BT * d
    ffn = (1 if fp32 else 2) * a * BT * d + 4 * a * BT * H  # w1 and w3 input(s); silu in, silu out, w3 out, w2 in
    return norms + attn_in + sdpa + wo + ffn


def _loss_bytes(m, B: int, device: str) -> tuple[int, int]:
    """(saved for backward, transient peak) of the LM loss at micro-batch B (mmscale.ops.cross_entropy)."""
    rows = B * m.n_ctx  # positions predicted (n_ctx of an n_ctx + 1 window)
    V, d = m.vocab_size, m.d_model
    logits = rows * V
    if logits >= CHUNKED_MIN_LOGITS:
        chunk = min(logits, (CUDA_CHUNK_ELEMENTS if device != "cpu" else CHUNK_ELEMENTS) // V * V or V)
        # saved: the hidden states and one log-sum-exp per row; transient: a chunk's fp32 logits, their
        # low-precision copy and the softmax gradient, and the fp32 gradient of the hidden states
        return 4 * rows * d + 4 * rows, 10 * chunk + 4 * rows * d
    # plain path: bf16 logits -> fp32 copy -> log-softmax (saved); backward: its gradient, the input gradient
    return 2 * rows * d + 4 * logits, 8 * logits


def activation_bytes(m, B: int, *, checkpointing: bool, fp32: bool, device: str) -> int:
    """Peak bytes of activations + loss of one micro-batch (the quantity micro-batch size scales)."""
    block = _block_saved_bytes(m, B, fp32)
    embed = 4 * B * m.n_ctx * m.d_model                    # the embedding output: the first block's input
    saved_loss, loss_peak = _loss_bytes(m, B, device)
    if checkpointing:  # only each block's fp32 input is kept; backward recomputes one block at a time
        blocks = 4 * B * m.n_ctx * m.d_model * m.n_layers + block
    else:
        blocks = block * m.n_layers
    return embed + blocks + saved_loss + loss_peak


# ----------------------------------------------------------------------------------------------
# model states and buffers per layout

def model_states(sizes: dict, layout: dict, world: int, convention: str = "mmscale", device: str = "cuda") -> dict:
    """{params, grads, optimizer, buffers} bytes per rank for the model's states under `layout`.

    convention "mmscale": mmscale's precision policy (fp32 weights, fp32 gradients, fp32 AdamW moments; DeepSpeed
    additionally keeps its fp32 master partition). convention "deepspeed": DeepSpeed's own estimators' accounting
    (16-bit weights and gradients, fp32 master + moments + fp32 gradient partition: 18 bytes a parameter
    partitioned), which `estimate_zero2/3_model_states_mem_needs` return as one sum.
    """
    N, blk = sizes["total"], sizes["block"]
    kind, stage = layout["engine"], layout.get("zero_stage")
    if convention == "deepspeed":
        if kind != "deepspeed" or stage not in (2, 3):
            raise ValueError("DeepSpeed's estimators cover ZeRO-2 and ZeRO-3 only")
        if stage == 2:  # 2 N 16-bit weights; 2 + 4 (16-bit + fp32 gradients) and 4 + 8 (master + moments) over W
            return {"params": 2 * N, "grads": 6 * N / world, "optimizer": 12 * N / world, "buffers": 0}
        # ZeRO-3: everything partitioned; the largest layer gathered (4 bytes a parameter in its accounting)
        # (its 18 bytes: 16-bit weights 2 + fp32 gradient 4 + fp32 master 4 + moments 8; 16-bit gradients not counted)
        return {"params": 2 * N / world, "grads": 4 * N / world, "optimizer": 12 * N / world,
                "buffers": 4 * sizes["largest_layer"]}
    S = world // layout.get("hsdp_replicas", 1) if kind == "fsdp" else world
    if kind in ("single", "ddp"):
        return {"params": 4 * N, "grads": 4 * N, "optimizer": 8 * N, "buffers": 4 * N if kind == "ddp" else 0}
    if kind == "deepspeed":
        opt = 4 * -(-N // world) + 8 * -(-N // world)  # fp32 master partition + two moments
        # the fp32 reduce bucket (contiguous_gradients): allocated whole (reduce_bucket_size elements, 2 GB) on a
        # GPU; on the CPU only the pages it fills (up to the model's size) become resident
        bucket = 4 * (DS_REDUCE_BUCKET if device != "cpu" else min(N, DS_REDUCE_BUCKET))
        if stage == 1:
            return {"params": 4 * N, "grads": 4 * N + 4 * -(-N // world), "optimizer": opt, "buffers": bucket}
        if stage == 2:  # gradients reduced into the partition through the bucket
            return {"params": 4 * N, "grads": 4 * -(-N // world), "optimizer": opt, "buffers": bucket}
        # ZeRO-3: fp32 partitions; gathered fp32 parameters: under DeepSpeed's defaults a parameter whose next use
        # is closer than stage3_max_reuse_distance (1e9 elements) stays gathered, so models under 1e9 parameters
        # keep them all between forward and backward (at least a block and the prefetch bucket); the reduce bucket
        gathered = 4 * max(min(N, DS_MAX_LIVE), blk + min(DS_PREFETCH_BUCKET, N))
        return {"params": 4 * -(-N // world), "grads": 4 * -(-N // world), "optimizer": opt,
                "buffers": gathered + bucket}
    # FSDP2 / HSDP: fp32 shards are the master weights; blocks gathered in bf16 (current + prefetched next),
    # the root (embedding, head, final norm) gathered in fp32 and kept for the step; one block's unsharded
    # fp32 gradient before its reduce-scatter, and the root's
    shard = -(-N // S)
    gathered = 2 * 2 * blk + 4 * sizes["root"]
    return {"params": 4 * shard, "grads": 4 * shard, "optimizer": 8 * shard,
            "buffers": gathered + 4 * blk + 4 * sizes["root"]}


def _bf16_copies(sizes: dict, layout: dict, precision: str) -> int:
    """autocast's bf16 casts of fp32 matmul weights, alive through forward and backward (saved by the matmuls).
    FSDP2 gathers blocks in bf16 already: only its fp32 root (embedding, head) is cast."""
    if precision != "bf16":
        return 0
    if layout["engine"] == "fsdp":
        return 2 * sizes["root"]
    return 2 * sizes["matmul"]


def layout_memory(cfg, engine: str, zero_stage: int | None, world: int, *, device: str = "cuda",
                  micro_batch: int | None = None, checkpointing: bool | None = None, hsdp_replicas: int = 1,
                  sizes: dict | None = None) -> tuple[dict, int]:
    """Per-rank bytes {params, grads, optimizer, activations, buffers, runtime, total} of `cfg` on one layout,
    and the parameter count. device "cpu" or a GPU (anything else): the runtime term and the loss's chunking."""
    sizes = sizes or model_sizes(cfg.model)
    layout = {"engine": engine, "zero_stage": zero_stage if engine == "deepspeed" else None,
              "hsdp_replicas": hsdp_replicas}
    mb = micro_batch if micro_batch is not None else cfg.train.micro_batch_size
    ac = cfg.engine.activation_checkpointing if checkpointing is None else checkpointing
    dev = "cpu" if device == "cpu" else "cuda"
    st = model_states(sizes, layout, world, device=dev)
    act = activation_bytes(cfg.model, mb, checkpointing=ac, fp32=cfg.engine.precision == "fp32", device=dev)
    if dev == "cpu":
        runtime = RUNTIME_BYTES.get(f"cpu-{engine}", RUNTIME_BYTES["cpu"])
    else:
        runtime = RUNTIME_BYTES["cuda"]
    buffers = st["buffers"] + _bf16_copies(sizes, layout, cfg.engine.precision)
    if dev == "cpu" and engine == "deepspeed" and zero_stage == 3:
        buffers += ZERO3_CPU_EXTRA_PER_PARAM * sizes["total"] - 4 * min(sizes["total"], DS_MAX_LIVE)
    if dev == "cpu":
        # every rank builds the whole fp32 model on the CPU before the engine shards it; that memory is reused
        # for the states that follow, so it raises the peak only when it is larger than what sharding leaves
        buffers += max(0, 4 * sizes["total"] - st["params"] - st["grads"])
    out = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"], "activations": act,
           "buffers": buffers, "runtime": runtime}
    out["total"] = sum(out.values())
    return out, sizes["total"]


# ----------------------------------------------------------------------------------------------
# step time

def comm_bytes(sizes: dict, layout: dict, world: int, grad_accum: int) -> dict:
    """Bytes each rank sends per optimizer step, by collective (ring algorithms: all-reduce 2 (W-1)/W S,
    all-gather and reduce-scatter (W-1)/W S each)."""
    N, blk, root, L = sizes["total"], sizes["block"], sizes["root"], sizes["n_layers"]
    kind, stage = layout["engine"], layout.get("zero_stage")
    R = layout.get("hsdp_replicas", 1) if kind == "fsdp" else 1
    S = world // R
    f = (S - 1) / S if S > 1 else 0.0
    out = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0}
    if world == 1:
        return out
    if kind == "ddp":
        out["all_reduce"] = 2 * f * 4 * N                       # fp32 gradients once a step (no_sync before)
    elif kind == "deepspeed" and stage == 1:
        out["reduce_scatter"] = f * 4 * N                       # gradients once, at the step boundary
        out["all_gather"] = f * 4 * N                           # updated fp32 weights
    elif kind == "deepspeed" and stage == 2:
        out["reduce_scatter"] = grad_accum * f * 4 * N          # every micro-batch into the partitions
        out["all_gather"] = f * 4 * N
    elif kind == "deepspeed":
        out["all_gather"] = grad_accum * 2 * f * 4 * N          # fp32 weights in forward and again in backward
        out["reduce_scatter"] = grad_accum * f * 4 * N
    else:  # FSDP2 / HSDP: bf16 blocks gathered in forward and backward, fp32 root once; fp32 reduce-scatter
        out["all_gather"] = grad_accum * f * (2 * 2 * blk * L + 4 * root)
        out["reduce_scatter"] = f * 4 * N                       # once a step (gradient sync off before)
        if R > 1:
            out["all_reduce"] = 2 * (R - 1) / R * 4 * N / S     # the shard's gradient across replicas
    return out


def n_collectives(sizes: dict, layout: dict, world: int, grad_accum: int) -> int:
    """Collectives per optimizer step (each pays COLLECTIVE_LATENCY_S): DDP one per 25 MB bucket; ZeRO-1/2 one
    per reduce bucket and one all-gather; ZeRO-3 and FSDP2 per block and micro-batch (gather in forward, again in
    backward, reduce)."""
    if world == 1:
        return 0
    N, L = sizes["total"], sizes["n_layers"]
    kind, stage = layout["engine"], layout.get("zero_stage")
    if kind == "ddp":
        return -(-4 * N // DDP_BUCKET_CAP)
    if kind == "deepspeed" and stage in (1, 2):
        return (grad_accum if stage == 2 else 1) * -(-N // DS_REDUCE_BUCKET) + 1
    if kind == "deepspeed":
        return grad_accum * 3 * (L + 1)
    return grad_accum * 2 * (L + 1) + (L + 1) + (1 if layout.get("hsdp_replicas", 1) > 1 else 0)


def step_time(sizes: dict, layout: dict, world: int, nodes: int, tokens_per_rank: int, grad_accum: int, *,
              peak: float | None, mfu: float, intra_bw: float, inter_bw: float, checkpointing: bool) -> dict:
    """Compute + exposed communication of one optimizer step (seconds), and its parts.

    Overlap: gradient reduction (ddp, ZeRO-1/2) runs under backward, 2/3 of compute; ZeRO-3 and FSDP2 prefetch
    their all-gathers, so all their traffic can hide under the whole compute; ZeRO-1/2's all-gather of updated
    weights after the optimizer step cannot hide. Traffic of a layout spanning nodes moves at the inter-node
    bandwidth per GPU; HSDP's shard collectives stay inside a node and only its replica all-reduce crosses."""
    flops = sizes["flops"]["causal"] * tokens_per_rank * (4 / 3 if checkpointing else 1)
    compute = flops / (peak * mfu) if peak else None
    c = comm_bytes(sizes, layout, world, grad_accum)
    kind, stage = layout["engine"], layout.get("zero_stage")
    latency = COLLECTIVE_LATENCY_S * n_collectives(sizes, layout, world, grad_accum)
    if kind == "fsdp" and layout.get("hsdp_replicas", 1) > 1:
        t_intra = (c["all_gather"] + c["reduce_scatter"]) / intra_bw
        t_inter = c["all_reduce"] / inter_bw
        comm, hideable, exposed_always = t_intra + t_inter, t_intra + t_inter, 0.0
    else:
        bw = inter_bw if nodes > 1 else intra_bw
        comm = sum(c.values()) / bw
        if kind in ("single", "ddp"):
            hideable, exposed_always = comm, 0.0
        elif kind == "deepspeed" and stage in (1, 2):
            exposed_always = c["all_gather"] / bw
            hideable = comm - exposed_always
        else:
            hideable, exposed_always = comm, 0.0
    comm += latency
    hideable += latency
    if compute is None:
        return {"compute_s": None, "comm_s": comm, "step_s": None, "comm_bytes": c}
    window = compute * (2 / 3 if kind in ("ddp", "deepspeed") and stage in (None, 1, 2) else 1.0)
    step = compute + max(0.0, hideable - window) + exposed_always
    return {"compute_s": compute, "comm_s": comm, "step_s": step, "comm_bytes": c}


def measured_mfu(device: str, results: Path | None = None) -> float | None:
    """An MFU measured by the trainer on `device`, from a row `| mfu-measured | DEVICE | 0.43 | ... |` in
    benchmarks/RESULTS.md (the convention gpu_check writes to); None when there is none."""
    path = results or Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(r"\|\s*mfu-measured\s*\|\s*([\w-]+)\s*\|\s*([0-9.]+)\s*\|", line)
        if m and m.group(1).lower() == device:
            return float(m.group(2))
    return None


# ----------------------------------------------------------------------------------------------
# the plan

def _meminfo(key: str) -> int | None:
    """One /proc/meminfo field in bytes (None where there is no such file or field)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_memory() -> int:
    return _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int | None:
    """What the kernel says can still be allocated without swapping (MemAvailable), or None."""
    return _meminfo("MemAvailable")


def make_plan(cfg, gpus: int, nodes: int = 1, device: str = "h100", interconnect: str | None = None,
              margin: float = DEFAULT_MARGIN, mfu: float | None = None, peak_flops: float | None = None,
              tokens: int | None = None) -> dict:
    """The whole plan as a dict (the --json output). `gpus` are per node; world = gpus x nodes."""
    _check_plan_args(gpus, nodes, device, interconnect, margin, mfu)
    dev = DEVICES[device]
    cfg, precision_note = _concrete_precision(cfg, device)
    world = gpus * nodes
    per_node = gpus
    mem = dev["memory"] if dev["memory"] else host_memory() // per_node  # the host is shared by its ranks
    usable = int(mem * (1 - margin))
    precision = cfg.engine.precision
    peak, peak_src, mfu, mfu_src = _peak_and_mfu(dev, device, precision, peak_flops, mfu)
    intra, inter, intra_bw, inter_bw = _bandwidths(dev, nodes, interconnect)

    sizes = model_sizes(cfg.model)
    sizes["n_layers"] = cfg.model.n_layers
    sizes["largest_layer"] = max(sizes["block"], sizes["embedding"])
    t = cfg.train
    auto = t.micro_batch_size == "auto"
    global_batch = _global_batch(t, auto, world)
    per_rank = global_batch // world
    n_ctx = cfg.model.n_ctx
    budget = tokens or t.max_steps * global_batch * n_ctx

    rows = [_plan_layout(cfg, lay, world, nodes, device, sizes, usable, per_rank, auto, peak, mfu, intra_bw,
                         inter_bw, n_ctx, budget)
            for lay in _layouts_for(world, nodes)]
    rec = _recommend(rows, usable)
    return {
        "config": {"model": {k: getattr(cfg.model, k) for k in ("kind", "d_model", "n_layers", "n_ctx", "vocab_size")},
                   "parameters": sizes["total"], "precision": precision,
                   "micro_batch_size": t.micro_batch_size, "global_batch_size": global_batch},
        "cluster": {"device": device, "device_label": dev["label"], "gpus_per_node": gpus, "nodes": nodes,
                    "ranks": world, "device_memory_bytes": mem, "margin": margin, "usable_bytes": usable,
                    "interconnect_intra": intra if nodes > 1 or interconnect is None else interconnect,
                    "interconnect_inter": inter if nodes > 1 else None,
                    "intra_bytes_per_s": intra_bw, "inter_bytes_per_s": inter_bw if nodes > 1 else None},
        "assumptions": {"precision": precision_note, "peak_flops": peak, "peak_source": peak_src, "mfu": mfu, "mfu_source": mfu_src,
                        "flops_per_token_training_causal": sizes["flops"]["causal"],
                        "flops_per_token_training_dense": sizes["flops"]["dense"],
                        "token_budget": budget,
                        "overlap": "gradient reduction hides under backward (2/3 of compute) for ddp and ZeRO-1/2; "
                                   "ZeRO-3/FSDP2 prefetch, so all their traffic can hide under compute; ZeRO-1/2's "
                                   "weight all-gather after the step is exposed",
                        "runtime": "CUDA context + NCCL: 1 GiB; CPU: fitted per engine (see RUNTIME_BYTES)"},
        "layouts": rows,
        "recommended": rec,
    }


def _check_plan_args(gpus: int, nodes: int, device: str, interconnect: str | None, margin: float,
                     mfu: float | None) -> None:
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1 (GPUs per node), got {gpus}", 2)
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}", 2)
    if device not in DEVICES:
        raise UserError(f"unknown --device '{device}'; choose one of: {', '.join(DEVICES)}", 2)
    if interconnect is not None and interconnect not in INTERCONNECTS:
        raise UserError(f"unknown --interconnect '{interconnect}'; choose one of: {', '.join(INTERCONNECTS)}", 2)
    if not 0 <= margin < 1:
        raise UserError(f"--margin must be in [0, 1) (the fraction of device memory kept free), got {margin}", 2)
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}", 2)


def _peak_and_mfu(dev: dict, device: str, precision: str, peak_flops: float | None, mfu: float | None):
    """(peak FLOP/s, its source, MFU, its source): the flags first, else the tables and measured results."""
    if peak_flops:
        peak, peak_src = peak_flops, "--peak-flops"
    elif dev["peak_name"]:
        peak, peak_src = lookup(dev["peak_name"], precision)
    else:
        peak, peak_src = None, "no peak FLOP/s for a CPU: give --peak-flops for a step time"
    if mfu is None:
        got = measured_mfu(device)
        mfu, mfu_src = (got, f"measured on {device} (benchmarks/RESULTS.md)") if got else (DEFAULT_MFU, MFU_SOURCE)
    else:
        mfu_src = "--mfu"
    return peak, peak_src, mfu, mfu_src


def _bandwidths(dev: dict, nodes: int, interconnect: str | None):
    """(intra-node link, inter-node link, their bytes/s): --interconnect names the slowest link in use."""
    intra = dev["intra"]
    inter = interconnect or ("ib-400" if nodes > 1 else intra)
    intra_bw = INTERCONNECTS[intra if nodes > 1 or interconnect is None else interconnect]
    return intra, inter, intra_bw, INTERCONNECTS[inter]


def _global_batch(t, auto: bool, world: int) -> int:
    if t.global_batch_size:
        global_batch = t.global_batch_size
    else:
        global_batch = (8 if auto else t.micro_batch_size) * t.grad_accum * world
    if global_batch % world:
        raise UserError(f"train.global_batch_size={global_batch} does not divide over {world} ranks; set it to a "
                        f"multiple of {world}", 2)
    return global_batch


def _recommend(rows: list[dict], usable: int) -> dict | None:
    """The layout to use: the fastest that fits; among layouts within 2% of it (or all, without a step time),
    the simplest. Marks every other row with why it lost; drops the rows' sort keys."""
    fitting = [r for r in rows if r["fits"]]
    rec = None
    if fitting:
        rank = {n: i for i, n in enumerate(LAYOUT_ORDER)}
        fastest = min((r["step_time_s"] for r in fitting if r["step_time_s"] is not None), default=None)
        close = [r for r in fitting if fastest is None or r["step_time_s"] <= fastest * 1.02]
        rec = min(close, key=lambda r: rank[r["_key"]])
        rec = dict(rec)
        rec["reason"] = (f"{rec['name']}: the fastest layout that fits (the simplest within 2% of the fastest): {_gib(rec['memory_per_rank_bytes']['total'])} "
                         f"of {_gib(usable)} usable per rank at micro-batch {rec['micro_batch_size']}"
                         + (", activation checkpointing on" if rec["activation_checkpointing"] else ""))
        for r in rows:
            if r is not None and r["name"] != rec["name"]:
                r["rejected_because"] = r["why"] if not r["fits"] else _slower(r, rec)
    for r in rows:
        r.pop("_key", None)
    if rec:
        rec.pop("_key", None)
    return rec


def _concrete_precision(cfg, device: str):
    """engine.precision auto -> what a run on `device` would pick (mmscale/precision.py): bf16 on every GPU in
    DEVICES (compute capability >= 8.0); on "cpu", by this host's CPU."""
    if cfg.engine.precision != "auto":
        return cfg, f"engine.precision: {cfg.engine.precision} as set"
    dev = DEVICES[device]
    facts = prec.cpu_facts() if device == "cpu" else prec.DeviceFacts("cuda", dev["label"], dev["capability"])
    chosen, line = prec.choose("auto", facts, override=os.environ.get(prec.ENV_AUTO))
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision=chosen)), line


def _slower(r: dict, rec: dict) -> str:
    if r["step_time_s"] is not None and rec["step_time_s"] is not None and r["step_time_s"] > rec["step_time_s"] * 1.02:
        return (f"fits, but slower: {r['step_time_s']:.3g} s/step against {rec['step_time_s']:.3g} "
                f"({_dominant_comm(r)})")
    if r["step_time_s"] is None:
        return f"fits; with no step time (no peak FLOP/s) the simpler layout, {rec['name']}, is preferred"
    return f"fits, about as fast; {rec['name']} is the simpler layout"


def _dominant_comm(r: dict) -> str:
    c = r["comm_bytes_per_step"]
    name, v = max(c.items(), key=lambda kv: kv[1])
    return f"{_gib(int(sum(c.values())))} sent per rank per step, mostly {name.replace('_', '-')}"


def _key(lay: dict) -> str:
    if lay["engine"] == "deepspeed":
        return f"zero{lay['zero_stage']}"
    if lay["engine"] == "fsdp":
        return "hsdp" if lay.get("hsdp_replicas", 1) > 1 else "fsdp"
    return lay["engine"]


def _largest_fitting(fits, cap: int = 1 << 20) -> int:
    """The largest micro-batch b <= cap with fits(b) (memory grows with b), 0 when not even 1 fits."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def _plan_layout(cfg, lay, world, nodes, device, sizes, usable, per_rank, auto, peak, mfu, intra_bw, inter_bw,
                 n_ctx, budget) -> dict:
    R = lay.get("hsdp_replicas", 1)
    mem_at = lambda mb, ac: layout_memory(cfg, lay["engine"], lay["zero_stage"], world, device=device,  # noqa: E731
                                          micro_batch=mb, checkpointing=ac, hsdp_replicas=R, sizes=sizes)[0]
    # the largest micro-batch that fits, without and with activation checkpointing (a divisor of the per-rank
    # batch, so the global batch is kept through gradient accumulation)
    best, best_div = {}, {}
    for ac in (False, True):
        best[ac] = _largest_fitting(lambda mb: mem_at(mb, ac)["total"] <= usable)  # noqa: B023
        best_div[ac] = next((mb for mb in _divisors_desc(per_rank) if mb <= best[ac]), 0)
    wanted_ac = cfg.engine.activation_checkpointing
    if auto:
        ac = wanted_ac or not best_div[False]
        mb = best_div[ac] or 1
    else:
        mb = cfg.train.micro_batch_size
        ac = wanted_ac or (mem_at(mb, False)["total"] > usable and mem_at(mb, True)["total"] <= usable)
    m = mem_at(mb, ac)
    fits = m["total"] <= usable
    grad_accum = max(1, per_rank // mb)
    st = step_time(sizes, lay, world, nodes, mb * grad_accum * n_ctx, grad_accum, peak=peak, mfu=mfu,
                   intra_bw=intra_bw, inter_bw=inter_bw, checkpointing=ac)
    tps = (world * mb * grad_accum * n_ctx / st["step_s"]) if st["step_s"] else None
    if fits:
        why = (f"fits: {_gib(m['total'])} of {_gib(usable)} per rank at micro-batch {mb}"
               + (" with activation checkpointing" if ac and not wanted_ac else "")
               + f" (largest that fits: {best[False] or 'none'} without, {best[True] or 'none'} with checkpointing)")
    else:
        states = m["params"] + m["grads"] + m["optimizer"]
        if states + m["buffers"] > usable:
            why = (f"does not fit: model states and buffers alone need {_gib(states + m['buffers'])} per rank "
                   f"against {_gib(usable)} usable ({_what_replicated(lay)})")
        else:
            why = (f"does not fit: {_gib(m['total'])} per rank at micro-batch {mb} against {_gib(usable)} usable "
                   f"(activations {_gib(m['activations'])}); lower train.micro_batch_size"
                   + ("" if ac else " or turn on engine.activation_checkpointing"))
    public = {k: m[k] for k in ("params", "grads", "optimizer", "activations")}
    public["buffers"] = m["buffers"] + m["runtime"]
    public["total"] = m["total"]
    return {"name": lay["name"], "_key": _key(lay), "engine": lay["engine"], "zero_stage": lay["zero_stage"],
            "hsdp_replicas": R if lay["engine"] == "fsdp" else None, "ranks": world,
            "memory_per_rank_bytes": public, "runtime_bytes": m["runtime"], "fits": fits, "why": why,
            "micro_batch_size": mb, "grad_accum": grad_accum, "activation_checkpointing": bool(ac),
            "max_micro_batch": {"without_checkpointing": best[False], "with_checkpointing": best[True],
                                "dividing_the_batch": {"without_checkpointing": best_div[False],
                                                       "with_checkpointing": best_div[True]}},
            "compute_s": st["compute_s"], "comm_s": st["comm_s"], "comm_bytes_per_step": st["comm_bytes"],
            "step_time_s": st["step_s"], "tokens_per_s": tps,
            "time_to_budget_s": budget / tps if tps else None}


def _what_replicated(lay) -> str:
    if lay["engine"] in ("single", "ddp"):
        return "weights, gradients and AdamW state are all replicated: shard them (ZeRO or FSDP2)"
    if lay["engine"] == "deepspeed" and lay["zero_stage"] in (1, 2):
        return "ZeRO-1/2 keep the whole fp32 model on every rank: use ZeRO-3 or FSDP2"
    return "even fully sharded: more GPUs, or a smaller model"


# ----------------------------------------------------------------------------------------------
# auto micro-batch (train.micro_batch_size: auto)

class _ProbeOOM(Exception):
    pass


def _current_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_fits(model, cfg, device, mb: int, limit: int, base: int | None = None) -> bool:
    """One forward + backward of `model` at micro-batch `mb` on `device` under the run's precision; False when it
    runs out of memory: a CUDA out-of-memory error or allocated memory passing `limit`; on the CPU (where the
    kernel would kill the process instead) `base` (the process's resident memory when the probe began) plus what
    this attempt holds passing `limit`. What it holds: the larger of the bytes it has saved for backward so far and
    its growth of resident memory (freed memory an earlier, larger attempt left resident is reused, so growth
    alone would under-count)."""
    cpu = device.type != "cuda"
    start = _current_bytes(device)
    base = start if base is None else base
    saved: dict = {}

    def used() -> int:
        if not cpu:
            return _current_bytes(device)
        return base + max(sum(saved.values()), _current_bytes(device) - start)

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        if used() > limit:
            raise _ProbeOOM
        return t

    ids = torch.randint(cfg.model.vocab_size, (mb, cfg.model.n_ctx + 1), device=device)
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.engine.precision == "bf16"
           else torch.autocast(device.type, enabled=False))
    loss = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _checkpointed(model, cfg):
            with ctx:
                loss = model(ids[:, :-1], ids)
            loss.backward()
        # on a GPU the limit already holds the layout's own gradients: the plain model's full ones are not counted
        grads = 0 if cpu else sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                  if p.grad is not None)
        ok = used() - grads <= limit
    except (_ProbeOOM, torch.OutOfMemoryError):
        ok = False
    finally:
        loss = None
        saved.clear()
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


class _checkpointed:
    """With engine.activation_checkpointing, the probe's blocks recompute in backward as the engine's will
    (torch.utils.checkpoint around each block's forward); the blocks are restored afterwards."""

    def __init__(self, model, cfg):
        self.blocks = list(model.blocks) if cfg.engine.activation_checkpointing else []

    def __enter__(self):
        self.had = [("forward" in b.__dict__, b.__dict__.get("forward")) for b in self.blocks]
        for b in self.blocks:
            b.forward = functools.partial(checkpoint, b.forward, use_reentrant=False)
        return self

    def __exit__(self, *exc):
        for b, (had, fwd) in zip(self.blocks, self.had):
            if had:
                b.forward = fwd
            else:
                del b.forward
        return False


def _planned_micro_batch(cfg, sizes, lay, world, limit, per_rank) -> int:
    """The largest micro-batch dividing the per-rank batch whose planned activations fit under `limit`."""
    fp32 = cfg.engine.precision == "fp32"
    for mb in _divisors_desc(per_rank):
        if activation_bytes(cfg.model, mb, checkpointing=cfg.engine.activation_checkpointing, fp32=fp32,
                            device="cuda") <= limit:
            return mb
    return 0


def resolve_auto_micro_batch(cfg, model, info, device, *, limit: int | None = None):
    """Replace train.micro_batch_size "auto" by the largest micro-batch that fits (halving on out-of-memory,
    from the per-rank share of the global batch), keeping train.global_batch_size through grad_accum.
    Returns (cfg, one line saying what was chosen). Every rank probes; all agree on the smallest."""
    t = cfg.train
    per_rank = t.global_batch_size // info.world_size
    engine_kind = cfg.engine.kind
    sizes = model_sizes(cfg.model)
    lay = {"engine": engine_kind, "zero_stage": cfg.engine.zero_stage if engine_kind == "deepspeed" else None,
           "hsdp_replicas": cfg.engine.hsdp_replicas}
    st = model_states(sizes, lay, info.world_size, device="cpu" if device.type == "cpu" else "cuda")
    was_cpu = next(model.parameters()).device
    cuda = device.type == "cuda"
    if limit is None:
        if cuda:  # the layout's own per-rank states (plan) plus what the attempt adds must fit
            total = torch.cuda.get_device_properties(device).total_memory
            limit = int(total * (1 - DEFAULT_MARGIN)) - sum(st.values()) - RUNTIME_BYTES["cuda"]
        else:
            avail = available_memory() or host_memory()
            share = int(avail * (1 - DEFAULT_MARGIN)) // max(1, info.local_world_size or 1)
            # states the probe's plain model does not hold yet: AdamW moments and the engine's buffers
            limit = _current_bytes(device) + share - st["optimizer"] - st["buffers"]
    tried, mb = [], per_rank
    chosen = 0
    base = 0 if cuda else _current_bytes(device)
    if cuda:
        try:
            model.to(device)  # the probe runs the plain model: a sharded layout's whole model may not fit
        except torch.OutOfMemoryError:
            model.to(was_cpu)
            torch.cuda.empty_cache()
            mb = 0
            chosen = _planned_micro_batch(cfg, sizes, lay, info.world_size, limit, per_rank)
            tried.append(f"the whole model does not fit one GPU: planned {chosen or 'none'}")
    while mb >= 1:
        if per_rank % mb:
            mb -= 1
            continue
        ok = probe_fits(model, cfg, device, mb, limit, base)
        tried.append(f"{mb} {'fits' if ok else 'out of memory'}")
        if ok:
            chosen = mb
            break
        mb //= 2
    if cuda:
        model.to(was_cpu)
    agreed = chosen
    if info.world_size > 1:
        v = torch.tensor([chosen], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
        tdist.all_reduce(v, op=tdist.ReduceOp.MIN)
        agreed = int(v.item())
    if agreed < 1:
        raise UserError(f"train.micro_batch_size=auto: not even one sample fits in memory ({'; '.join(tried)}); "
                        "turn on engine.activation_checkpointing, shard the model (engine.kind=fsdp) or use "
                        "more ranks", 1)
    grad_accum = per_rank // agreed
    line = (f"train.micro_batch_size auto: {agreed} (probe: {', '.join(tried)}; limit {_gib(limit)} on "
            f"{device.type}); grad_accum {grad_accum} keeps the global batch {t.global_batch_size}")
    new = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=agreed, grad_accum=grad_accum))
    return new, line


# ----------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=1024")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--device", default="h100", help=f"one of: {', '.join(DEVICES)} (cpu: this host's memory)")
    parser.add_argument("--interconnect", default=None,
                        help=f"between nodes (within one node when --nodes 1); one of: {', '.join(INTERCONNECTS)}; "
                             "default nvlink inside a node, ib-400 between nodes")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="fraction of device memory kept free (fragmentation, NCCL, spikes)")
    parser.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation (live FLOPs) to assume")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device (overrides the table)")
    parser.add_argument("--tokens", type=float, default=None,
                        help="token budget for the time estimate (default: train.max_steps x tokens per step)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def _gib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if abs(n) < GiB else f"{n / GiB:,.2f} GiB"


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(p: dict) -> str:
    c, cl, a = p["config"], p["cluster"], p["assumptions"]
    m = c["model"]
    lines = [f"{m['kind']} d_model {m['d_model']}, {m['n_layers']} layers, n_ctx {m['n_ctx']}, vocab {m['vocab_size']}: "
             f"{c['parameters']:,} parameters, {c['precision']}, global batch {c['global_batch_size']} "
             f"(micro-batch {c['micro_batch_size']})",
             f"{cl['nodes']} node(s) x {cl['gpus_per_node']} {cl['device_label']}: {_gib(cl['device_memory_bytes'])} "
             f"per rank, {_gib(cl['usable_bytes'])} usable ({cl['margin']:.0%} margin); interconnect "
             f"{cl['interconnect_intra']}" + (f" inside a node, {cl['interconnect_inter']} between nodes"
                                              if cl["nodes"] > 1 else ""),
             f"step time: {a['flops_per_token_training_causal']:,} training FLOPs/token (live; dense "
             f"{a['flops_per_token_training_dense']:,}) at MFU "
             f"{a['mfu']:.0%} ({a['mfu_source']}) of {a['peak_flops'] / 1e12:,.1f} TFLOP/s"
             if a["peak_flops"] else f"step time: n/a ({a['peak_source']})",
             f"overlap: {a['overlap']}", "",
             "per rank                  params     grads  optimizer activations  buffers     total  fits  mb  AC  "
             "step      tokens/s   to budget"]
    for r in p["layouts"]:
        b = r["memory_per_rank_bytes"]
        g = lambda k: f"{b[k] / GiB:9.2f}"  # noqa: E731
        tps = f"{r['tokens_per_s']:12,.0f}" if r["tokens_per_s"] else f"{'n/a':>12}"
        lines.append(f"{r['name'][:24]:<24}{g('params')}{g('grads')}{g('optimizer')}{g('activations'):>12}"
                     f"{g('buffers')}{g('total')}  {'yes' if r['fits'] else ' no'} {r['micro_batch_size']:>3} "
                     f"{'on' if r['activation_checkpointing'] else 'off':>3}  {_dur(r['step_time_s']):>9}{tps}"
                     f"  {_dur(r['time_to_budget_s']):>9}")
    lines.append("(GiB; buffers include the runtime: CUDA context or torch's own memory on the CPU)")
    rec = p["recommended"]
    lines.append("")
    if rec is None:
        lines.append("recommended: nothing fits; " + min(p["layouts"], key=lambda r: r["memory_per_rank_bytes"]
                                                          ["total"])["why"])
    else:
        lines.append(f"recommended: {rec['reason']}")
        mx = rec["max_micro_batch"]
        lines.append(f"  largest micro-batch that fits: {mx['without_checkpointing'] or 'none'} "
                     f"without activation checkpointing, {mx['with_checkpointing'] or 'none'} with (dividing the "
                     f"per-rank batch {c['global_batch_size'] // cl['ranks']}: "
                     f"{mx['dividing_the_batch']['without_checkpointing'] or 'none'} / "
                     f"{mx['dividing_the_batch']['with_checkpointing'] or 'none'}); activation checkpointing "
                     f"{'needed' if rec['activation_checkpointing'] else 'not needed'}; "
                     f"grad_accum {rec['grad_accum']}; time to {a['token_budget']:,.0f} tokens: "
                     f"{_dur(rec['time_to_budget_s'])}")
        for r in p["layouts"]:
            if r.get("rejected_because"):
                lines.append(f"  not {r['name']}: {r['rejected_because']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.gpus, args.nodes, args.device.lower(), args.interconnect, args.margin, args.mfu,
                     args.peak_flops, int(args.tokens) if args.tokens else None)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


__all__ = ["activation_bytes", "layout_memory", "make_plan", "model_states", "probe_fits",
           "resolve_auto_micro_batch"]
