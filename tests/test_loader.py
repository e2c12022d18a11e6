"""The streaming loader: exact tokens, seeded order, exact resume (1 rank, 2 ranks, 2 -> 1), disjoint ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from mmscale.config import DataConfig, ModelConfig
from mmscale.data.loader import IGNORE_INDEX, build_dataloader, check_dataset
from mmscale.data.sources import iter_text_documents
from mmscale.errors import UserError
from tests._data_helpers import make_tiny_corpus, make_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
N_CTX = 32


@pytest.fixture(autouse=True)
def _no_world_env(monkeypatch):
    # build_dataloader sets RANK/WORLD_SIZE/...; each test starts without them and leaves none behind
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("packed"), n_ctx=N_CTX, stories=120)


def take(loader, n_batches: int) -> list[list[int]]:
    """The next n_batches batches' windows (labels rows), as lists."""
    rows, it = [], iter(loader)
    for _ in range(n_batches):
        rows.extend(next(it)["labels"].tolist())
    return rows


def loader_for(path, *, seed=7, batch=4, rank=0, world=1, split="train", endless=None, **data):
    cfg = DataConfig(train=str(path), **data)
    return build_dataloader(cfg, split, n_ctx=N_CTX, micro_batch_size=batch, seed=seed, rank=rank,
                            world_size=world, endless=endless)


def reference_windows(text_path, tok_path, n_ctx, docs_subset=None) -> list[list[int]]:
    """Packed windows computed independently: encode each document, append EOS, cut."""
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    docs = list(iter_text_documents(str(text_path)))
    if docs_subset is not None:
        docs = [d for i, d in enumerate(docs) if i in docs_subset]
    stream = []
    for d in docs:
        stream += sp.encode(d) + [sp.eos_id()]
    w = n_ctx + 1
    return [stream[i:i + w] for i in range(0, len(stream) // w * w, w)]


def test_packed_loader_returns_exactly_the_tokens(tmp_path):
    text, tok = make_tiny_corpus(400, 0, 512)
    data = make_tiny_dataset(tmp_path, n_ctx=N_CTX, stories=400, val_fraction=0.0)
    ref = reference_windows(text, tok, N_CTX)
    with loader_for(data, shuffle=False, batch=8) as loader:
        n = len(ref) // 8
        it = iter(loader)
        got = []
        for _ in range(n):
            b = next(it)
            assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (8, N_CTX)
            assert b["labels"].shape == (8, N_CTX + 1)
            assert torch.equal(b["input_ids"], b["labels"][:, :-1])
            got += b["labels"].tolist()
    assert got == ref[:n * 8]


@pytest.mark.parametrize("pad", ["right", "left"])
def test_padded_batches_mask_pads(tmp_path, pad):
    text, tok = make_tiny_corpus(400, 0, 512)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = list(iter_text_documents(str(text)))[:40]
    (tmp_path / "few.txt").write_text("".join(d + "\n<|endoftext|>\n" for d in docs))
    from mmscale.data.prepare import PrepareOptions, prepare

    n_ctx = 240  # some stories are longer (truncated), others shorter (padded)
    prepare(PrepareOptions(inputs=[str(tmp_path / "few.txt")], tokenizer=str(tok), n_ctx=n_ctx,
                           out=str(tmp_path / "d"), layout="padded", pad=pad, val_fraction=0.0,
                           workers=1, progress=False))
    cfg = DataConfig(train=str(tmp_path / "d"), shuffle=False)
    with build_dataloader(cfg, "train", n_ctx=n_ctx, micro_batch_size=8, seed=0, endless=False) as loader:
        batches = list(loader)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert ids.shape == (40, n_ctx) and labels.shape == (40, n_ctx)
    truncated = 0
    for row_ids, row_labels, doc in zip(ids, labels, docs):
        want = (sp.encode(doc) + [sp.eos_id()])[:n_ctx]
        truncated += len(want) == n_ctx
        real = row_labels != IGNORE_INDEX
        assert int(real.sum()) == len(want)
        assert row_labels[real].tolist() == want
        assert row_ids[real].tolist() == want
        assert (row_ids[~real] == sp.pad_id()).all()
        # pads are on the requested side
        first_real = int(real.float().argmax())
        assert (first_real == 0) if pad == "right" else (first_real == n_ctx - len(want))
    assert 0 < truncated < 40


def test_same_seed_same_order_other_seed_other_order(packed):
    with loader_for(packed, seed=1) as a:
        first = take(a, 6)
    with loader_for(packed, seed=1) as b:
        again = take(b, 6)
    with loader_for(packed, seed=2) as c:
        other = take(c, 6)
    assert first == again
    assert first != other


def test_train_loader_is_endless_and_resumes_exactly_mid_epoch_and_across_epochs(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    per_epoch = manifest["splits"]["train"]["samples"] // 4
    total = per_epoch + per_epoch // 2 + 3  # into the second epoch
    with loader_for(packed) as full:
        straight = take(full, total)
        assert full.state_dict()["epoch"] == 1
    # the second epoch is a different permutation of the same samples
    assert straight[:per_epoch * 4] != straight[per_epoch * 4:per_epoch * 8]
    for cut in (5, per_epoch + 2):  # mid-epoch 0, mid-epoch 1
        with loader_for(packed) as first:
            part = take(first, cut)
            state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        with loader_for(packed) as second:
            second.load_state_dict(state)
            rest = take(second, total - cut)
        assert part + rest == straight, f"resume after {cut} batches differs"


def test_iterating_again_continues_where_the_last_iteration_stopped(packed):
    with loader_for(packed, seed=4) as plain:
        want = take(plain, 30)
    with loader_for(packed, seed=4) as loader:
        got = take(loader, 10) + take(loader, 20)  # two iter() calls on one loader
    assert got == want


def test_worker_processes_keep_the_order_and_the_resume(packed):
    with loader_for(packed, seed=5) as plain:
        want = take(plain, 70)
    with loader_for(packed, seed=5, num_workers=2) as workers:
        assert take(workers, 70) == want
    with loader_for(packed, seed=5, num_workers=2) as first:
        part = take(first, 30)
        state = first.state_dict()
    with loader_for(packed, seed=5, num_workers=2) as second:
        second.load_state_dict(state)
        assert part + take(second, 40) == want


def test_val_loader_is_one_pass_over_every_val_sample(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    with loader_for(packed, split="val", batch=4) as val:
        rows = [r for b in val for r in b["labels"].tolist()]
        again = [r for b in val for r in b["labels"].tolist()]
    assert len(rows) == manifest["splits"]["val"]["samples"]
    assert rows == again  # unshuffled and the same every evaluation


def test_local_path_as_remote_with_cache_dir(packed, tmp_path):
    with loader_for(packed, seed=3) as direct:
        want = take(direct, 4)
    with loader_for(packed, seed=3, cache_dir=str(tmp_path / "cache")) as cached:
        got = take(cached, 4)
    assert got == want
    assert any((tmp_path / "cache").rglob("*.mds*"))


def _zstd_only_copy(src, dst):
    """A copy of a prepared dataset without the raw shards an earlier read decompressed."""
    import shutil

    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n.endswith(".mds")])
    return dst


def test_a_read_only_dataset_directory_asks_for_a_cache(packed, tmp_path, monkeypatch):
    import tempfile

    data = _zstd_only_copy(packed, tmp_path / "ro")
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # (chmod does not stop root, who runs CI)
        if dir is not None and Path(dir).resolve().is_relative_to(data.resolve()):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match="not writable.*set data.cache_dir"):
        loader_for(data)
    # through a cache it reads, and nothing is written into the dataset
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with loader_for(data, cache_dir=str(tmp_path / "cache")) as cached:
        assert len(take(cached, 2)) == 8
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_no_lock_file_or_temporary_file_is_left_in_the_dataset(packed, tmp_path):
    """Streaming's lock files live on this node's /dev/shm (one folder for every loader there), never in the
    dataset; decompressing writes only the raw shards, under their final names."""
    from mmscale.data import loader as loader_module

    data = _zstd_only_copy(packed, tmp_path / "d")
    before = {p.relative_to(data) for p in data.rglob("*")}
    with loader_for(data, endless=False) as loader:
        prefix = loader.dataset._shm_prefix_int
        locks = loader_module.lock_root()
        assert json.loads((locks / f"{prefix:06}.owner").read_text())["pid"] == os.getpid()
        n = 0
        for batch in loader:  # (streaming takes its locks when it starts iterating)
            n += len(batch["input_ids"])
            assert (locks / f"{prefix:06}_barrier_filelock").exists()
    assert n > 0
    added = {p.relative_to(data) for p in data.rglob("*")} - before
    assert added and all(p.suffix == ".mds" and p.parent.name == "train" for p in added), sorted(map(str, added))
    assert not [p for p in locks.iterdir() if p.name.startswith(f"{prefix:06}")]


def test_concurrent_decompression_of_one_shard_leaves_one_complete_file(packed, tmp_path):
    """Two streams decompressing the same shard at once (two nodes on one dataset) each write a private file and
    rename it into place: no shared `raw.tmp`, and the result is the complete shard."""
    import threading

    from mmscale.data._streaming import import_streaming
    from mmscale.data.loader import _atomic_stream_class

    data = _zstd_only_copy(packed, tmp_path / "d")
    index = json.loads((data / "train" / "index.json").read_text())
    sh = index["shards"][0]
    raw_info = type("Info", (), {"basename": sh["raw_data"]["basename"], "bytes": sh["raw_data"]["bytes"],
                                 "hashes": sh["raw_data"].get("hashes", {})})()
    zip_info = type("Info", (), {"basename": sh["zip_data"]["basename"], "bytes": sh["zip_data"]["bytes"],
                                 "hashes": sh["zip_data"].get("hashes", {})})()
    cls = _atomic_stream_class(import_streaming())
    streams = [cls(local=str(data), split="train", validate_hash="xxh64", keep_zip=True) for _ in range(2)]
    start, errors = threading.Barrier(2), []

    def run(stream):
        start.wait()
        try:
            for _ in range(20):
                stream._decompress_shard_part(zip_info, str(data / "train" / zip_info.basename),
                                              str(data / "train" / raw_info.basename), "zstd")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    from mmscale.fsutil import digest

    # the size and digest `prepare` recorded for the raw shard when it wrote it
    assert digest(data / "train" / raw_info.basename) == (raw_info.bytes, raw_info.hashes["xxh64"])
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(
        {p.name for p in (packed / "train").iterdir() if p.name.endswith((".zstd", ".json"))} | {raw_info.basename})


def test_remote_with_a_url_scheme_is_cached(packed, tmp_path, monkeypatch):
    """A remote URL goes through mosaicml-streaming's downloaders: register one for a test scheme
    that reads local files, the way s3:// or gs:// would fetch objects."""
    from mmscale.data._streaming import import_streaming

    import_streaming()
    from streaming.base.storage import download as dl

    class TestSchemeDownloader(dl.LocalDownloader):
        @staticmethod
        def _client_identifier() -> str:
            return "mmtest"

        def _download_file_impl(self, remote, local, timeout):
            fetched.append(remote)
            super()._download_file_impl(remote[len("mmtest://"):], local, timeout)

    fetched = []
    monkeypatch.setitem(dl.DOWNLOADER_MAPPINGS, "mmtest", TestSchemeDownloader)
    url = f"mmtest://{packed}"
    vocab = json.loads((packed / "manifest.json").read_text())["vocab_size"]
    assert check_dataset(url, ModelConfig(n_ctx=N_CTX, vocab_size=vocab), cache_dir=str(tmp_path / "c"))
    with loader_for(packed, seed=3) as direct:
        want = take(direct, 4)
    with loader_for(url, seed=3, cache_dir=str(tmp_path / "c")) as remote:
        assert take(remote, 4) == want
    assert any(f.endswith("manifest.json") for f in fetched) and any(".mds" in f for f in fetched)
    with pytest.raises(UserError, match="set data.cache_dir"):
        check_dataset(url, ModelConfig(n_ctx=N_CTX, vocab_size=vocab))
    with pytest.raises(UserError, match="could not fetch"):
        check_dataset(f"mmtest://{tmp_path}/nothing", ModelConfig(), cache_dir=str(tmp_path / "c"))


def test_check_dataset_names_both_values(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    assert check_dataset(str(packed), ModelConfig(n_ctx=N_CTX, vocab_size=vocab))["n_ctx"] == N_CTX
    with pytest.raises(UserError, match=rf"n_ctx {N_CTX}.*model.n_ctx is 64"):
        check_dataset(str(packed), ModelConfig(n_ctx=64, vocab_size=vocab))
    with pytest.raises(UserError, match=rf"vocab size {vocab}.*model.vocab_size is 4096"):
        check_dataset(str(packed), ModelConfig(n_ctx=N_CTX, vocab_size=4096))
    tok = packed / "tokenizer.model"
    check_dataset(str(packed), ModelConfig(n_ctx=N_CTX, vocab_size=vocab), tokenizer=str(tok))
    with pytest.raises(UserError, match=r"sha256 [0-9a-f]{16}.*tokenizer is 0{16}"):
        check_dataset(str(packed), ModelConfig(n_ctx=N_CTX, vocab_size=vocab), tokenizer="0" * 64)
    with pytest.raises(UserError, match="not a prepared dataset"):
        check_dataset(str(packed / "train"), ModelConfig(n_ctx=N_CTX, vocab_size=vocab))


def test_build_dataloader_refuses_bad_arguments(packed, monkeypatch):
    with pytest.raises(UserError, match=rf"n_ctx {N_CTX} but the model's n_ctx is 16"):
        build_dataloader(DataConfig(train=str(packed)), "train", n_ctx=16, micro_batch_size=2, seed=0)
    with pytest.raises(UserError, match="data.train is empty"):
        build_dataloader(DataConfig(), "train", n_ctx=N_CTX, micro_batch_size=2, seed=0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="WORLD_SIZE=4 contradicts"):
        build_dataloader(DataConfig(train=str(packed)), "train", n_ctx=N_CTX, micro_batch_size=2, seed=0,
                         rank=0, world_size=2)


# ---------------------------------------------------------------------------------------------
# two processes over gloo

def _rank_main() -> None:
    """One rank of test_two_ranks (started by it): uninterrupted and resumed runs, 2 ranks."""
    import torch.distributed as dist

    args = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    cfg = DataConfig(train=args["data"])
    kw = dict(n_ctx=N_CTX, micro_batch_size=args["batch"], seed=args["seed"], rank=rank, world_size=world)
    out = {}
    with build_dataloader(cfg, "train", **kw) as loader:
        out["straight"] = take(loader, args["total"])
    with build_dataloader(cfg, "train", **kw) as loader:
        out["part"] = take(loader, args["cut"])
        out["state"] = loader.state_dict()
    with build_dataloader(cfg, "train", **kw) as loader:
        loader.load_state_dict(out["state"])
        out["rest"] = take(loader, args["total"] - args["cut"])
    with build_dataloader(cfg, "val", **kw) as val:
        out["val"] = [r for b in val for r in b["labels"].tolist()]
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _run_two_ranks(args: dict, timeout: float = 90) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "from tests.test_loader import _rank_main; _rank_main()", json.dumps(args)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, "\n".join(x[-3000:] for x in logs)
    return [json.loads(Path(args["out"], f"rank{r}.json").read_text()) for r in range(2)]


def _interleave(per_rank: list[list], batch: int) -> list:
    """The global sample order of a multi-rank run: batch i of rank r holds global positions
    i * world * batch + j * world + r (mosaicml-streaming deals samples round-robin over ranks)."""
    world = len(per_rank)
    out = []
    for i in range(len(per_rank[0]) // batch):
        chunk = [per_rank[r][i * batch:(i + 1) * batch] for r in range(world)]
        out += [chunk[r][j] for j in range(batch) for r in range(world)]
    return out


@pytest.mark.distributed
def test_two_ranks_disjoint_resumable_and_onto_one_rank(packed, tmp_path):
    manifest = json.loads((packed / "manifest.json").read_text())
    n_train = manifest["splits"]["train"]["samples"]
    batch, seed = 2, 11
    per_epoch = n_train // (2 * batch)  # batches per rank per epoch
    total, cut = per_epoch + 3, per_epoch // 2
    r0, r1 = _run_two_ranks({"data": str(packed), "batch": batch, "seed": seed, "total": total, "cut": cut,
                             "out": str(tmp_path)})
    # ranks are disjoint within an epoch and together cover every sample (streaming may repeat
    # up to world - 1 samples to even out the ranks)
    with loader_for(packed, shuffle=False, batch=1, split="train", endless=False) as plain:
        every = Counter(tuple(r) for b in plain for r in b["labels"].tolist())
    epoch0 = Counter(tuple(r) for r in r0["straight"][:per_epoch * batch] + r1["straight"][:per_epoch * batch])
    assert not (epoch0 - every)
    assert sum((every - epoch0).values()) <= 2 * batch  # the dropped incomplete last batch
    assert sum((epoch0 - every).values()) == 0
    # the 2-rank global order is the 1-rank order
    with loader_for(packed, seed=seed, batch=2 * batch) as one:
        one_rank = take(one, total)
    assert _interleave([r0["straight"], r1["straight"]], batch) == one_rank
    # resume on 2 ranks
    for r in (r0, r1):
        assert r["part"] + r["rest"] == r["straight"]
    assert r0["state"] == r1["state"]
    # resume the 2-rank state on 1 rank (same global batch): the uninterrupted sequence continues
    with loader_for(packed, seed=seed, batch=2 * batch) as resumed:
        resumed.load_state_dict(r0["state"])
        rest = take(resumed, total - cut)
    assert _interleave([r0["part"], r1["part"]], batch) + rest == one_rank
    # ... and with the same micro batch (half the global batch): the same global order, within the epoch
    with loader_for(packed, seed=seed, batch=batch) as resumed:
        resumed.load_state_dict(r0["state"])
        rest = take(resumed, 2 * (per_epoch - cut))
    assert rest == one_rank[cut * 2 * batch:per_epoch * 2 * batch]
    # val: the two ranks split the val samples (one pass, padded by at most one repeat)
    val = Counter(tuple(r) for r in r0["val"] + r1["val"])
    with loader_for(packed, split="val", batch=1) as v:
        every_val = Counter(tuple(r) for b in v for r in b["labels"].tolist())
    assert not (every_val - val) and sum((val - every_val).values()) <= 1


def test_loaders_leave_the_environment_as_they_found_it(packed, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # the caller's own value survives
    train = loader_for(packed, split="train")
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"  # streaming reads them while open
    val = loader_for(packed, split="val", endless=False)
    val.close()
    assert os.environ["WORLD_SIZE"] == "1"  # the train loader is still open: still set
    take(train, 1)
    train.close()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ and "LOCAL_RANK" not in os.environ
    assert os.environ["LOCAL_WORLD_SIZE"] == "1"
