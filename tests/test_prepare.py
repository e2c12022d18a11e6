"""`mmscale prepare`: manifest and counts by hand, layouts, input formats, workers, atomic output, bad input."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from mmscale.cli import main as cli
from mmscale.config import DataConfig
from mmscale.data import prepare as prep
from mmscale.data.loader import build_dataloader
from mmscale.data.prepare import PrepareOptions, prepare
from mmscale.data.sources import iter_text_documents
from mmscale.fsutil import file_sha256
from mmscale.errors import UserError
from tests._data_helpers import make_tiny_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MISTRAL = SHARED / "tokenizers" / "mistral_32k.model"


@pytest.fixture(autouse=True)
def _no_world_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def corpus():
    text, tok = make_tiny_corpus(400, 0, 512)
    return text, tok, list(iter_text_documents(str(text)))


def opts(inputs, tok, out, **kw) -> PrepareOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("n_ctx", 32)
    return PrepareOptions(inputs=[str(i) for i in inputs], tokenizer=str(tok), out=str(out), **kw)


def read_split(path: Path, split: str, n_ctx: int) -> list[dict]:
    """Every sample of a split, in stored order, through the loader."""
    with build_dataloader(DataConfig(train=str(path), shuffle=False), split, n_ctx=n_ctx, micro_batch_size=1,
                          seed=0, endless=False) as loader:
        return [{k: v[0].tolist() for k, v in b.items()} for b in loader]


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*.mds*"))}


def test_packed_manifest_matches_a_hand_count(corpus, tmp_path):
    text, tok, docs = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    m = prepare(opts([text], tok, tmp_path / "d", val_fraction=0.1, seed=5))
    on_disk = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert on_disk == m
    n_tokens = sum(len(sp.encode(d)) for d in docs)
    assert m["source_tokens"] == n_tokens and m["documents"] == len(docs) == 400
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert va["documents"] == 40 and tr["documents"] == 360
    # every token plus one EOS per document lands in a window or in the dropped tail
    for s in (tr, va):
        assert s["tokens"] == s["samples"] * 33 and 0 <= s["dropped_tokens"] < 33
    assert tr["tokens"] + tr["dropped_tokens"] + va["tokens"] + va["dropped_tokens"] == n_tokens + 400
    assert m["n_ctx"] == 32 and m["layout"] == "packed" and m["dtype"] == "uint16"
    assert m["vocab_size"] == 512 and m["tokenizer"]["sha256"] == file_sha256(tok)
    assert m["sources"] == [{"path": str(text), "kind": "text", "documents": 400, "sha256": file_sha256(text)}]
    assert (tmp_path / "d" / "tokenizer.model").read_bytes() == Path(tok).read_bytes()
    assert all((tmp_path / "d" / s / "index.json").is_file() for s in ("train", "val"))


def test_padded_split_holds_every_document_once(corpus, tmp_path):
    text, tok, docs = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    n_ctx = 320
    m = prepare(opts([text], tok, tmp_path / "d", n_ctx=n_ctx, layout="padded", val_fraction=0.25, seed=1))
    decoded = Counter()
    for split in ("train", "val"):
        for s in read_split(tmp_path / "d", split, n_ctx):
            real = [t for t, lab in zip(s["input_ids"], s["labels"]) if lab != -100]
            assert real[-1] == sp.eos_id() or len(real) == n_ctx
            decoded[sp.decode(real[:-1] if real[-1] == sp.eos_id() else real)] += 1
    assert decoded == Counter(docs)  # (no story here is longer than n_ctx)
    assert m["splits"]["val"]["samples"] == 100 and m["splits"]["train"]["samples"] == 300
    # a different split seed puts other documents in val
    prepare(opts([text], tok, tmp_path / "e", n_ctx=n_ctx, layout="padded", val_fraction=0.25, seed=2))
    assert read_split(tmp_path / "d", "val", n_ctx) != read_split(tmp_path / "e", "val", n_ctx)


def test_text_jsonl_parquet_and_directory_inputs_give_identical_shards(corpus, tmp_path):
    text, tok, docs = corpus
    jsonl = tmp_path / "in" / "docs.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet", row_group_size=64)
    prepare(opts([text], tok, tmp_path / "a"))
    prepare(opts([jsonl], tok, tmp_path / "b", text_field="body"))
    prepare(opts([tmp_path / "docs.parquet"], tok, tmp_path / "c", text_field="body"))
    prepare(opts([tmp_path / "in"], tok, tmp_path / "d", text_field="body"))  # a directory of inputs
    want = shard_bytes(tmp_path / "a")
    assert want and all(shard_bytes(tmp_path / x) == want for x in "bcd")
    # documents separated by blank lines instead of separator lines
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n".join(docs[:50]).replace("\n", " ").replace("  ", "\n\n"))
    flat_docs = [d.replace("\n", " ") for d in docs[:50]]
    assert list(iter_text_documents(str(blank))) == flat_docs


def test_hugging_face_dataset_by_name(corpus, tmp_path, monkeypatch):
    """The `hf:` loading code, against a stand-in `datasets` module (no network in tests)."""
    import sys
    import types

    text, tok, docs = corpus
    calls = []

    class FakeDataset:
        column_names = ["id", "story"]

        def __len__(self):
            return len(docs)

        def __getitem__(self, column):
            assert column == "story"
            return list(docs)

    from mmscale.data._streaming import import_streaming

    import_streaming()  # (it imports transformers, which probes the real `datasets`)
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config=None, split=None: calls.append((name, config, split)) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    m = prepare(opts(["hf:someone/stories:small@train"], tok, tmp_path / "hf", text_field="story"))
    prepare(opts([text], tok, tmp_path / "txt"))
    assert calls and all(c == ("someone/stories", "small", "train") for c in calls)
    assert shard_bytes(tmp_path / "hf") == shard_bytes(tmp_path / "txt")
    assert m["sources"][0]["kind"] == "hf" and m["sources"][0]["documents"] == len(docs)
    with pytest.raises(UserError, match="has no column 'text'"):
        prepare(opts(["hf:someone/stories"], tok, tmp_path / "x"))


def test_worker_processes_give_the_same_shards(corpus, tmp_path):
    text, tok, _ = corpus
    prepare(opts([text], tok, tmp_path / "one", workers=1))
    prepare(opts([text], tok, tmp_path / "two", workers=2))
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_existing_output_is_kept_unless_overwrite(corpus, tmp_path):
    text, tok, _ = corpus
    out = tmp_path / "d"
    prepare(opts([text], tok, out, n_ctx=32))
    before = shard_bytes(out)
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        prepare(opts([text], tok, out, n_ctx=16))
    assert shard_bytes(out) == before
    prepare(opts([text], tok, out, n_ctx=16, overwrite=True))
    assert json.loads((out / "manifest.json").read_text())["n_ctx"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no partial or old copies left


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch):
    text, tok, _ = corpus
    calls = []

    def interrupted(self, flat, lengths):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, flat, lengths)

    original = prep._PackedSplit.add
    monkeypatch.setattr(prep._PackedSplit, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts([text], tok, tmp_path / "d"))
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_with_one_line_and_write_nothing(corpus, tmp_path, capsys, monkeypatch):
    text, tok, _ = corpus
    # the hf: case below is the machine without `datasets` (make setup installs it, as lm-eval's dependency;
    # with it and no network, the hub's retries take ~25 s before the same one-line error)
    monkeypatch.setitem(sys.modules, "datasets", None)
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes("Once upon a time.\n".encode() + b"caf\xe9 au lait\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    only_separators = tmp_path / "seps.txt"
    only_separators.write_text("<|endoftext|>\n\n<|endoftext|>\n")
    no_field = tmp_path / "x.jsonl"
    no_field.write_text('{"text": "a story"}\n{"body": "another"}\n')
    not_json = tmp_path / "y.jsonl"
    not_json.write_text('{"text": "a story"}\n{oops\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    big = _tokenizer_with_66k_pieces(tok, tmp_path / "big.model")
    cases = [
        ([str(tmp_path / "missing.txt")], [], "does not exist"),
        ([str(empty)], [], "is empty"),
        ([str(only_separators)], [], "holds no documents"),
        ([str(bad_utf8)], [], f"not valid UTF-8 at byte offset {len('Once upon a time.') + 4}"),
        ([str(no_field)], [], "line 2 has no field 'text'"),
        ([str(not_json)], [], "line 2 is not valid JSON"),
        ([str(tmp_path / "p.parquet")], [], "no column 'text'"),
        ([str(text)], ["--n-ctx", "1"], "--n-ctx must be at least 2"),
        ([str(text)], ["--tokenizer", str(big), "--dtype", "uint16"], "vocab (65546) does not fit --dtype uint16"),
        ([str(text)], ["--tokenizer", str(tmp_path / "nope.model")], "does not exist"),
        ([str(text)], ["--val-fraction", "0.9999"], "leaves no training documents"),
        ([str(text)], ["--n-ctx", "100000"], "no training sample"),
        (["hf:roneneldan/TinyStories"], [], "needs the `datasets` library"),
    ]
    for inputs, extra, message in cases:
        args = ["prepare", "--data", *inputs, "--tokenizer", str(tok), "--n-ctx", "32", "--workers", "1",
                "--out", str(tmp_path / "out"), "--no-progress", *extra]
        code = cli(args)
        err = capsys.readouterr().err
        assert code != 0 and message in err and err.count("\n") == 1, (message, err)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # --errors replace reads the same file, with U+FFFD for the bad byte
    assert cli(["prepare", "--data", str(bad_utf8), "--tokenizer", str(tok), "--n-ctx", "4",
                "--errors", "replace", "--val-fraction", "0", "--workers", "1", "--out", str(tmp_path / "ok"),
                "--no-progress"]) == 0
    assert list(iter_text_documents(str(bad_utf8), errors="replace")) == ["Once upon a time.\ncaf\ufffd au lait"]
    # a vocab over 65536 ids is stored as uint32 by default
    m = prepare(opts([text], big, tmp_path / "big"))
    assert m["dtype"] == "uint32"


def _tokenizer_with_66k_pieces(tok: Path, out: Path) -> Path:
    """The small tokenizer plus never-used pieces up to 65,546 ids (more than uint16 holds)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(tok).read_bytes())
    for i in range(65546 - len(m.pieces)):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"zq{i}", -1000.0, pb.ModelProto.SentencePiece.NORMAL
    out.write_bytes(m.SerializeToString())
    return out


@pytest.mark.shared_data
@pytest.mark.skipif(not MISTRAL.is_file(), reason=f"{MISTRAL} is absent (../shared/data only exists on dev/CI machines)")
def test_prepare_with_a_real_32k_tokenizer(corpus, tmp_path):
    text, _, docs = corpus
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL))
    m = prepare(opts([text], MISTRAL, tmp_path / "d", n_ctx=64, val_fraction=0.0))
    assert m["vocab_size"] == 32000 and m["tokenizer"]["pad_value"] == sp.eos_id()  # no pad id: pad with EOS
    stream = [t for d in docs for t in sp.encode(d) + [sp.eos_id()]]
    got = [t for s in read_split(tmp_path / "d", "train", 64) for t in s["labels"]]
    assert got == stream[:len(got)] and len(got) == m["splits"]["train"]["samples"] * 65
