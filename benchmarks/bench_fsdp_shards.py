"""Per-rank memory of the token-mixing weights under FSDP2, by shard count (issue 24, item 3).

    python benchmarks/bench_fsdp_shards.py [--n-ctx 512] [--layers 4] [--worlds 2 3 4]

For each world size it starts that many CPU processes (gloo), builds the masked mixer (heads 1, kernel 1: one
[1, 1, T, T] mixing weight per layer), shards it as mmscale's FSDP engine does (`shard_with_fsdp`), and
reports per rank: the bytes FSDP2 keeps for the mixing weights (its padded sharded storage,
`FSDPParam._sharded_param_data`), the placement and sharded shape it used, that as a fraction of the unsharded
total (1/world is the ideal), and the bytes one all-gather of them moves into each rank (world x the padded
shard: FSDP2 all-gathers the padded storage). Then it runs one training step and reports the process's peak RSS
growth.

FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, `_init_sharded_param`) chunks a parameter on its
shard dim, then allocates every rank's storage at the size of chunk 0 (`padded_sharded_size = chunks[0].size()`,
`new_zeros(padded_sharded_size)`) and only dim 0 may be uneven (NotImplementedError otherwise). On dim 0 of a
[1, 1, T, T] weight chunk 0 is the whole matrix: before mmscale flattened the weights, every rank held a full
T x T buffer whenever the rank count did not divide T, and the all-gather moved world x T x T. The engine now
shards the [heads * k * T, T] row view (`flatten_mixing_weights`): ceil(rows / world) rows per rank.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rank(rank: int, world: int, port: int, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from mmscale.config import ModelConfig
    from mmscale.engines.fsdp import build_mesh, shard_with_fsdp
    from mmscale.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_ctx=args.n_ctx, vocab_size=256, heads=1)
    model = build_model(cfg)
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 4)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = shard_with_fsdp(model, build_mesh(world, 1, "cpu"), "fp32")
    from mmscale.models import TokenMixer

    held, placements = 0, set()
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        for fp in (group.fsdp_params if group is not None else []):
            if isinstance(fp._module_info.module, TokenMixer) and fp._module_info.param_name == "weight":
                held += fp._sharded_param_data.numel() * fp._sharded_param_data.element_size()
                shape = "x".join(map(str, fp._orig_size))
                placements.add(f"{fp.fsdp_placement} of {shape}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, args.n_ctx))
    loss = model(ids, labels=torch.cat([ids, ids[:, :1]], 1))
    loss.backward()
    opt.step()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put((rank, held, total, sorted(placements), (rss1 - rss0) / 1024))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    import torch.multiprocessing as mp

    from mmscale.distributed import free_port

    print(f"n_ctx {args.n_ctx}, {args.layers} layers of one [1, 1, T, T] mixing weight (fp32), d_model {args.d_model}")
    print("| ranks | placement | mixing-weight bytes held per rank | of the total | ideal 1/world | all-gathered into "
          "each rank | peak RSS growth per rank (step incl.) |")
    print("|---|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        q = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, args, q)) for r in range(world)]
        for p in procs:
            p.start()
        rows = sorted(q.get() for _ in procs)
        for p in procs:
            p.join()
        held = [r[1] for r in rows]
        total = rows[0][2]
        print(f"| {world} | {', '.join(rows[0][3])} | {' / '.join(f'{h / 2**20:.2f} MiB' for h in held)} | "
              f"{max(held) / total:.2f} | {1 / world:.2f} | {world * max(held) / 2**20:.2f} MiB "
              f"({world * max(held) / total:.2f} x the weights) | {' / '.join(f'{r[4]:.0f} MiB' for r in rows)} |")


if __name__ == "__main__":
    main()
