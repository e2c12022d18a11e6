"""Several readers of ONE dataset directory, each with its own /dev/shm (as SLURM jobs or nodes have).

    sudo .venv/bin/python tools/stress_shared_dataset.py --rounds 20 [--procs 2] [--fresh-copy]

Each round starts `--procs` processes at once, each in a private mount namespace with its own tmpfs
on /dev/shm (`unshare --mount`, needs root), so every one of them gets mosaicml-streaming's prefix
000000. They pair up on the same dataset directory: both readers of a pair open the train split at
the same moment and read a batch, then the odd one closes its loader and the even one reads on to the
end of its epoch and into the next (new shards, a new epoch: streaming takes its lock files again);
then each reads the val split. The even reader checks that its lock file survived its partner's close
(before the fix it did not: both had prefix 000000 and one lock folder in the dataset, so the close
removed it, and the next lock taken there raced with the folder's removal). With `--fresh-copy` every round reads a fresh
copy of the dataset whose shards are zstd only, so the readers also race to decompress the same
shards (streaming's `raw.tmp`). A round fails when any reader exits non-zero; the script prints one
line per round and a summary, and exits 1 if any round failed.

Before issue 24's fix (lock files in `<dataset>/.streaming-locks/`, decompression through one shared
`raw.tmp`), rounds failed with FileNotFoundError on the lock files or the temp file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

READER = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from mmscale.config import DataConfig
from mmscale.data.loader import build_dataloader
from mmscale.errors import UserError
data, sync, me, procs = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def wait_for(name):
    deadline = time.time() + 120
    while not (sync / name).exists():
        if time.time() > deadline:
            sys.exit(f"reader {me}: timed out waiting for {name}")
        time.sleep(0.01)


def open_split(split, endless=False):
    return build_dataloader(DataConfig(train=data), split, n_ctx=16, micro_batch_size=2, seed=0, endless=endless)


(sync / f"ready-{me}").write_text("")
for i in range(procs):
    wait_for(f"ready-{i}")
n = 0
try:
    if me % 2 == 0:  # holder: keeps its train loader open across its partner's open and close, then goes on
        loader = open_split("train", endless=True)
        it = iter(loader)
        n += len(next(it)["input_ids"])
        (sync / f"opened-{me}").write_text("")
        if me + 1 < procs:
            wait_for(f"closed-{me + 1}")
        # our own lock file must still be there: the partner's close may only remove the partner's
        import mmscale.data.loader as L
        lock_dir = L.lock_root() if hasattr(L, "lock_root") else Path(data) / ".streaming-locks"
        mine = lock_dir / f"{loader.dataset._shm_prefix_int:06}_barrier_filelock"
        if not mine.exists():
            sys.exit(f"reader {me}: its lock file {mine} was deleted by the other reader's close "
                     f"(both got prefix {loader.dataset._shm_prefix_int:06})")
        for _ in range(len(loader) + 2):  # the rest of the epoch and into the next: new shards, new epoch
            n += len(next(it)["input_ids"])
        loader.close()
    else:  # closer: opens the same dataset at the same moment, then closes it while its partner reads on
        loader = open_split("train")
        n += len(next(iter(loader))["input_ids"])
        wait_for(f"opened-{me - 1}")
        loader.close()
        (sync / f"closed-{me}").write_text("")
    loader = open_split("val")
    for batch in loader:
        n += len(batch["input_ids"])
    loader.close()
except UserError as e:
    sys.exit(f"reader {me}: {e}")
print(n)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--stories", type=int, default=600, help="size of the built-in corpus (more: more shards)")
    ap.add_argument("--fresh-copy", action="store_true", help="a fresh zstd-only copy of the dataset per round")
    args = ap.parse_args()
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        print("error: needs root and `unshare --mount` (private /dev/shm per reader); run it as root",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from tests._data_helpers import make_tiny_dataset

    work = Path(tempfile.mkdtemp(prefix="mmscale-stress-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    failed = 0
    try:
        source = make_tiny_dataset(work, n_ctx=16, stories=args.stories)
        counts = set()
        for r in range(args.rounds):
            data = source
            if args.fresh_copy:
                data = work / f"copy-{r}"
                shutil.copytree(source, data)
            sync = work / f"sync-{r}"
            sync.mkdir()
            t0 = time.time()
            procs = []
            for i in range(args.procs):
                code = (f'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -c "$1" "$2" "$3" "$4" "$5" "$6"')
                procs.append(subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", code, sys.executable, READER,
                     str(REPO), str(data), str(sync), str(i), str(args.procs)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            outs = [p.communicate(timeout=300) for p in procs]
            bad = [(i, p.returncode, err.strip().splitlines()[-1:] or [""]) for i, (p, (_, err)) in
                   enumerate(zip(procs, outs)) if p.returncode != 0]
            counts.update(o.strip() for p, (o, _) in zip(procs, outs) if p.returncode == 0)
            status = "ok" if not bad else "FAILED " + "; ".join(f"reader {i} rc {rc}: {e[0][:160]}"
                                                                   for i, rc, e in bad)
            failed += bool(bad)
            print(f"round {r + 1}/{args.rounds}: {time.time() - t0:.1f} s {status}", flush=True)
            if args.fresh_copy:
                shutil.rmtree(data, ignore_errors=True)
        print(f"{args.rounds - failed}/{args.rounds} rounds passed ({args.procs} readers each"
              f"{', fresh zstd-only copy per round' if args.fresh_copy else ''}); samples read per reader: "
              f"{sorted(counts)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
