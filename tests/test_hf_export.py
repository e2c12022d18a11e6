"""`mmscale export-hf`: exports that load in transformers, sentence-transformers and lm-evaluation-harness,
and Hugging Face tokenizers as `mmscale prepare` input.

References are computed by mmscale itself (its models, `mmscale generate`, `mmscale eval`, Embedder and
sentencepiece), never by the code under test: logits to 1e-5 (fp32), greedy tokens exactly, unit vectors to
cosine 0.99999, lm-eval's log-likelihoods and perplexity to 1e-4 relative on the same contexts.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.cli import main as cli_main
from mmscale.config import ModelConfig
from mmscale.errors import UserError
from mmscale.export.format import load_export, save_export
from tests._data_helpers import make_tiny_corpus

transformers = pytest.importorskip("transformers", reason="the ecosystem extra (make setup) is not installed")
pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512
N_CTX = 32
KINDS = {  # the variants the issue names: flat, multi-head, kernel k, bidirectional, and the Llama baseline
    "flat": dict(kind="mixer"),
    "multihead_k3": dict(kind="mixer", mixer="multihead", heads=4, kernel_size=3, final_norm=True,
                         tie_embeddings=True),
    "bidirectional": dict(kind="mixer", bidirectional=True, kernel_size=3),
    "llama": dict(kind="transformer", heads=4, kv_heads=2),
}
CAUSAL = ["flat", "multihead_k3", "llama"]
TEXTS = ["Once upon a time, there was a little girl named Lily.", " leading space", "two  spaces   three",
         "line\nbreak\n\nblank", "digits 12345 and 3.14", "unicode é ü 漢字 🙂", "tabs\tand\t\ttabs", "trailing  ",
         "\n", " ", "<s> specials </s> <pad> stay text", "Hello,World!?"]


def _cfg(kind: str) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_ctx=N_CTX, vocab_size=VOCAB, heads=1)
    return ModelConfig(**{**base, **KINDS[kind]})


@pytest.fixture(scope="module")
def corpus():
    text, tok = make_tiny_corpus(stories=200, vocab_size=VOCAB)
    import sentencepiece as spm
    return text, tok, spm.SentencePieceProcessor(model_file=str(tok))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, corpus):
    """{kind: (mmscale export, HF export)}: random-initialised models (biases and norms perturbed too)."""
    from mmscale.export.hf import export_hf
    from mmscale.models import build_model

    _, tok, _ = corpus
    root = tmp_path_factory.mktemp("hf_exports")
    out = {}
    for i, kind in enumerate(KINDS):
        cfg = _cfg(kind)
        torch.manual_seed(i)
        model = build_model(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # norm gains and biases away from their init, so a dropped one shows
                    p.add_(0.1 * torch.randn_like(p))
        save_export(root / kind, model.state_dict(), cfg, tok, info={"steps": 0})
        summary = export_hf(root / kind, root / f"{kind}-hf", position=-2 if kind == "flat" else "last")
        assert summary["verify"]["ok"], summary
        out[kind] = (root / kind, root / f"{kind}-hf")
    return out


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _ids(n=3, length=N_CTX, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# transformers

@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_hidden_states_and_loss_match_mmscale(exports, kind):
    src, hf_dir = exports[kind]
    ref, _ = load_export(src)
    hf = _hf(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    if kind == "llama":  # native: no remote code at all
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert type(hf).__name__ == "LlamaForCausalLM" and not list(hf_dir.glob("modeling_*.py"))
    else:
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmscale_mixer.MaskedMixerForCausalLM"
        assert config["n_ctx"] == N_CTX and config["model_type"] == "mmscale_masked_mixer"
        assert hf.config.max_position_embeddings == N_CTX and hf.config.n_positions == N_CTX
    ids = _ids()
    with torch.no_grad():
        for length in (N_CTX, 11):
            got = hf(ids[:, :length]).logits
            want = ref(ids[:, :length])
            assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5, kind
        # labels: HF's shift convention, the same mean cross-entropy as mmscale's forward with labels
        labels = ids.clone()
        labels[0, 5:9] = -100
        assert abs(hf(ids, labels=labels).loss.item() - ref(ids, labels=labels).item()) <= 1e-5
        out = hf(ids[:, :20], output_hidden_states=True)
        assert len(out.hidden_states) == ref.config.n_layers + 1
        for k, h in enumerate(out.hidden_states):
            want = ref.hidden(ids[:, :20], upto=k if k < ref.config.n_layers else None)
            assert (h - want).abs().max().item() <= 1e-5, (kind, k)


@pytest.mark.parametrize("kind", ["flat", "bidirectional"])
def test_mixer_attention_mask_is_absent_positions(exports, kind):
    """A left- or right-padded row gives, at its real positions, exactly the logits of the row alone."""
    src, hf_dir = exports[kind]
    ref, _ = load_export(src)
    hf = _hf(hf_dir)
    ids = _ids(2, 12, seed=3)
    with torch.no_grad():
        alone = ref(ids[:1, :7])
        for side in ("left", "right"):
            batch = ids.clone()
            mask = torch.ones_like(batch)
            if side == "left":
                batch[0] = torch.cat([torch.zeros(5, dtype=torch.long), ids[0, :7]])
                mask[0, :5] = 0
                got = hf(batch, attention_mask=mask).logits[0, 5:]
            else:
                batch[0, 7:] = 0
                mask[0, 7:] = 0
                got = hf(batch, attention_mask=mask).logits[0, :7]
            assert (got - alone[0]).abs().max().item() <= 1e-5, side
        assert (hf(ids, attention_mask=torch.ones_like(ids)).logits - ref(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", CAUSAL)
def test_generate_greedy_equals_mmscale_generate(exports, corpus, kind, capsys):
    from transformers import AutoTokenizer

    from mmscale.export.generate import generate_ids

    _, _, sp = corpus
    src, hf_dir = exports[kind]
    ref, _ = load_export(src)
    hf = _hf(hf_dir)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)  # 5.x asks otherwise (remote code)
    prompt_text, n_new = "Once upon a time", 14
    prompt = [sp.eos_id()] + sp.encode(prompt_text)  # what `mmscale generate` feeds: a document starts after EOS
    assert [tok.eos_token_id] + tok(prompt_text)["input_ids"] == prompt
    want = generate_ids(ref, prompt, n_new, temperature=0, eos_id=sp.eos_id(), pad_id=sp.pad_id())
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)
    got = out[0, len(prompt):].tolist()
    assert got == want and len(got) >= 1
    # top-k 1 sampling goes through GenerationMixin's sampling path and must pick the same tokens
    sampled = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=True, top_k=1, temperature=0.7)
    assert sampled[0, len(prompt):].tolist() == want
    sampled = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=True, top_k=40, temperature=0.8)
    assert sampled.shape[1] <= len(prompt) + 6 and int(sampled.max()) < VOCAB
    # the command-line `mmscale generate`, greedy, prints the same text
    assert cli_main(["generate", str(src), "--prompt", prompt_text, "--max-new-tokens", str(n_new),
                     "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == prompt_text + sp.decode([t for t in got if t != sp.eos_id()])
    if "\ufffd" not in printed:  # HF's byte fallback turns a whole invalid UTF-8 run into U+FFFD, sentencepiece
        assert printed == prompt_text + tok.decode(got, skip_special_tokens=True)  # only its invalid bytes
    if kind != "llama":
        # batched, left-padded (as pipelines and lm-eval pad): each row as if alone
        prompts = [[sp.eos_id()] + sp.encode(t) for t in (prompt_text, "Lily saw a big red ball in the")]
        width = max(map(len, prompts))
        ids = torch.tensor([[sp.pad_id()] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        assert mask.min() == 0
        batch = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row, p in enumerate(prompts):
            alone = generate_ids(ref, p, 6, temperature=0, eos_id=sp.eos_id(), pad_id=sp.pad_id())
            assert batch[row, width:width + len(alone)].tolist() == alone, row
        # past the fixed window: one clear error, before anything runs
        with pytest.raises(ValueError, match=rf"n_ctx = 32.*max_new_tokens <= {N_CTX - len(prompt)}"):
            hf.generate(torch.tensor([prompt]), max_new_tokens=N_CTX)
        with pytest.raises(ValueError, match="exceeds the masked mixer's fixed window n_ctx = 32"):
            hf(_ids(1, N_CTX + 1))


def test_save_pretrained_round_trip_and_no_mmscale_import(exports, corpus, tmp_path):
    src, hf_dir = exports["multihead_k3"]
    hf = _hf(hf_dir)
    ids = _ids(2)
    with torch.no_grad():
        before = hf(ids).logits
    hf.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "modeling_mmscale_mixer.py").is_file()
    again = _hf(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
    assert again.lm_head.weight.data_ptr() == again.model.embed.weight.data_ptr()  # tied stays tied
    # the modeling file imports torch and transformers only
    code = (hf_dir / "modeling_mmscale_mixer.py").read_text()
    imported = set(re.findall(r"^\s*(?:from|import)\s+([a-zA-Z_]+)", code, re.M))
    assert imported <= {"__future__", "math", "typing", "torch", "transformers"}, imported
    # and loads in a process where mmscale cannot be imported at all
    torch.save({"ids": ids, "logits": before}, tmp_path / "ref.pt")
    script = ("import sys; sys.modules['mmscale'] = None\n"
              "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "ref = torch.load(sys.argv[2])\n"
              "with torch.no_grad(): d = (m(ref['ids']).logits - ref['logits']).abs().max().item()\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "print(d, t('Once upon a time')['input_ids'])\n")
    res = subprocess.run([sys.executable, "-c", script, str(hf_dir), str(tmp_path / "ref.pt")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    diff, ids_text = res.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(diff) <= 1e-6 and json.loads(ids_text) == corpus[2].encode("Once upon a time")


def test_tokenizer_round_trips_like_sentencepiece(exports, corpus, tmp_path):
    from transformers import AutoTokenizer

    from mmscale.data.tokenizer import train_tokenizer
    from mmscale.export.hf import check_tokenizer, sentencepiece_to_tokenizers

    text, _, sp = corpus
    stories = Path(text).read_text()
    samples = TEXTS + stories.split("\n")[:200] + [stories[:5000]]
    tok = AutoTokenizer.from_pretrained(str(exports["flat"][1]), trust_remote_code=True)
    # the generic fast tokenizer over tokenizer.json (transformers 5 calls it TokenizersBackend)
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert tok.bos_token is None and tok.eos_token == "</s>"
    assert tok.model_max_length == N_CTX
    for s in samples:
        ids = tok(s)["input_ids"]  # default add_special_tokens: nothing added (mmscale's data has no BOS)
        assert ids == sp.encode(s), s[:40]
        assert tok.decode(ids) == sp.decode(ids) == s, s[:40]
    # a unigram model converts exactly too (texts without literal control-piece names)
    uni = train_tokenizer([str(text)], 400, tmp_path / "uni.model", model_type="unigram")
    import sentencepiece as spm
    usp = spm.SentencePieceProcessor(model_file=str(uni))
    check_tokenizer(sentencepiece_to_tokenizers(uni), usp, [s for s in samples if "<s>" not in s])
    # a model that normalises text is refused in one line
    nfkc = tmp_path / "nfkc.model"
    spm.SentencePieceTrainer.Train(input=str(text), model_prefix=str(tmp_path / "nfkc"), vocab_size=300,
                                   minloglevel=2)
    with pytest.raises(UserError, match="normalises text") as e:
        sentencepiece_to_tokenizers(nfkc)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# sentence-transformers

@pytest.mark.parametrize("kind,position", [("flat", -2), ("bidirectional", "last"), ("llama", "last")])
def test_sentence_transformers_equals_embedder(exports, kind, position):
    st_mod = pytest.importorskip("sentence_transformers")
    from mmscale import Embedder

    src, hf_dir = exports[kind]
    assert json.loads((hf_dir / "1_Pooling" / "config.json").read_text())["position"] == position
    st = st_mod.SentenceTransformer(str(hf_dir), trust_remote_code=True, device="cpu")
    texts = ["Once upon a time there was a cat.", "A summary.", "Lily went to the park with a big red ball and",
             "x", "a very long text " * 20]
    got = st.encode(texts, batch_size=2, convert_to_numpy=True)
    # batch_size 1: the bidirectional mixer sees pad tokens of longer batch neighbours in Embedder, none in HF
    want = Embedder.from_export(src, position=position).encode(texts, batch_size=1)
    assert got.shape == want.shape == (len(texts), 32)
    cos = (got * want).sum(1) / (abs(got * got).sum(1) ** 0.5 * (want * want).sum(1) ** 0.5)
    assert cos.min() >= 0.99999, cos
    assert abs((got * got).sum(1) - 1).max() <= 1e-5
    dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    assert dim() == 32


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness

def _exact_window_doc(sp, stories: str, n_tokens: int):
    """(text, rest, first_id): a text of exactly n_tokens pieces whose first word is one piece (first_id) and
    whose other pieces are the pieces of `rest`, the text after that word and its space."""
    words = stories.split()
    for start, first in enumerate(words):
        if len(sp.encode(first)) != 1:
            continue
        doc = []
        for w in words[start:]:
            doc.append(w)
            if len(sp.encode(" ".join(doc))) >= n_tokens:
                break
        text = " ".join(doc)
        ids = sp.encode(text)
        rest = text[len(first) + 1:]
        if len(ids) == n_tokens and ids[1:] == sp.encode(rest):
            return text, rest, ids[0]
    raise AssertionError("no document of the right length in the corpus")


def _write_tasks(root: Path, ppl_docs: list[str], mc_docs: list[dict], gen_docs: list[dict]) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ppl_docs))
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc_docs))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen_docs))
    # generation inside the mixer's window: max_gen_toks < n_ctx (lm-eval's default 256 is longer than the window)
    (tasks / "mmscale_gen.yaml").write_text(
        "task: mmscale_test_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "mmscale_ppl.yaml").write_text(
        "task: mmscale_test_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'ppl.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "mmscale_mc.yaml").write_text(
        "task: mmscale_test_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return tasks


def _mmscale_choice_loglik(model, sp, context: str, cont: str) -> float:
    """lm-eval's scoring of a continuation, computed with mmscale: pieces of context + continuation split
    after the context's pieces (trailing spaces of the context move to the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, cont = context[:-n], context[-n:] + cont
    ctx = sp.encode(context)
    whole = sp.encode(context + cont)
    cont_ids = whole[len(ctx):]
    seq = (ctx + cont_ids)[-(model.config.n_ctx + 1):]
    inp = torch.tensor([seq[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp)[0].double(), -1)
    targets = seq[-len(cont_ids):]
    start = len(seq) - 1 - len(cont_ids)
    return sum(float(logp[start + i, t]) for i, t in enumerate(targets))


@pytest.mark.slow
def test_lm_eval_runs_and_agrees_with_mmscale_eval(exports, corpus, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    text, _, sp = corpus
    stories = Path(text).read_text()
    # contexts made equal: mmscale eval packs "W rest" (+ EOS) into one window of n_ctx + 1 tokens and predicts
    # its last n_ctx pieces; lm-eval (prefix token = the piece of the word W, max_length = n_ctx from the config)
    # predicts every piece of "rest" in one rolling window
    doc, rest, once = _exact_window_doc(sp, stories, N_CTX + 1)
    # lm-eval joins question and choice with its target delimiter " "
    mc = [{"question": "Once upon a", "choices": ["time", "dog", "hill"], "label": 0},
          {"question": "Lily went to the", "choices": ["park", "moon"], "label": 0},
          {"question": "The cat was", "choices": ["happy.", "sad and tired."], "label": 1}]
    gen = [{"question": "Once upon a time, there was a", "answer": "little girl"}]
    tasks = _write_tasks(tmp_path, [rest], mc, gen)
    runs = {}
    for kind in ("flat", "llama"):
        runs[kind] = tmp_path / f"out-{kind}"
    specs = [["--model", "hf", "--model_args",
              f"pretrained={exports[kind][1]},trust_remote_code=True,prefix_token_id={once}",
              "--tasks", "mmscale_test_ppl,mmscale_test_mc,mmscale_test_gen", "--include_path", str(tasks),
              "--device", "cpu",
              "--batch_size", "2", "--output_path", str(runs[kind]), "--log_samples"] for kind in runs]
    # the lm_eval command's own entry point, twice in one process (one import of lm-eval)
    script = ("import json, sys\nfrom lm_eval.__main__ import cli_evaluate\n"
              "for spec in json.loads(sys.argv[1]):\n    sys.argv = ['lm_eval'] + spec\n    cli_evaluate()\n")
    # a plain one-process lm_eval, as a user runs it: no launcher variables from whatever started pytest
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher},
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", script, json.dumps(specs)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    (tmp_path / "doc.txt").write_text(doc + "\n")
    for kind, out in runs.items():
        samples = {t: [json.loads(x) for f in out.rglob(f"samples_{t}_*.jsonl") for x in f.read_text().splitlines()]
                   for t in ("mmscale_test_ppl", "mmscale_test_mc", "mmscale_test_gen")}
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        ll = float(samples["mmscale_test_ppl"][0]["filtered_resps"][0])
        assert cli_main(["eval", str(exports[kind][0]), "--data", str(tmp_path / "doc.txt"), "--json",
                         str(tmp_path / f"eval-{kind}.json")]) == 0
        ev = json.loads((tmp_path / f"eval-{kind}.json").read_text())
        assert ev["tokens"] == N_CTX
        lm_ppl = math.exp(-ll / N_CTX)
        assert abs(lm_ppl - ev["perplexity"]) <= 1e-4 * ev["perplexity"], (kind, lm_ppl, ev)
        words = len(re.split(r"\s+", rest))
        word_ppl = results["mmscale_test_ppl"]["word_perplexity,none"]
        assert abs(word_ppl - math.exp(ev["loss"] * N_CTX / words)) <= 1e-4 * word_ppl
        # multiple choice: every choice's log-likelihood as mmscale computes it, and the accuracy
        ref, _ = load_export(exports[kind][0])
        correct = 0
        for s in sorted(samples["mmscale_test_mc"], key=lambda s: s["doc_id"]):
            d = mc[s["doc_id"]]
            want = [_mmscale_choice_loglik(ref, sp, d["question"], " " + c) for c in d["choices"]]
            got = [float(r[0]) for r in s["filtered_resps"]]
            assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4 * max(1.0, max(map(abs, want))), (kind, got, want)
            correct += int(max(range(len(want)), key=want.__getitem__) == d["label"])
        assert results["mmscale_test_mc"]["acc,none"] == pytest.approx(correct / len(mc))
        # generate_until: lm-eval's greedy continuation is mmscale's greedy continuation of the same pieces
        from transformers import AutoTokenizer

        from mmscale.export.generate import generate_ids
        tok = AutoTokenizer.from_pretrained(str(exports[kind][1]), trust_remote_code=True)
        new = generate_ids(ref, sp.encode(gen[0]["question"]), 8, temperature=0, eos_id=sp.eos_id())
        want = tok.decode([t for t in new if t != sp.eos_id()], skip_special_tokens=True).split("\n\n")[0]
        assert samples["mmscale_test_gen"][0]["filtered_resps"][0] == want, kind


# ---------------------------------------------------------------------------------------------
# from sharded checkpoints, the command line, errors

@pytest.mark.distributed
def test_export_hf_from_zero3_and_fsdp2_checkpoints(tmp_path, corpus):
    from tests._dist import run_distributed, tiny_config

    _, tok, _ = corpus
    base = {"model.vocab_size": VOCAB, "train.max_steps": 2}
    runs = {"zero3": {**base, "engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.precision": "bf16",
                      "model.mixer": "multihead", "model.heads": 2, "retrieval.position": "-2"},
            "fsdp2": {**base, "engine.kind": "fsdp", "engine.precision": "fp32", "model.kind": "transformer",
                      "model.heads": 2, "model.tie_embeddings": True}}
    payload = {"runs": [{"config": tiny_config(tmp_path / name, **ov)} for name, ov in runs.items()]}
    assert run_distributed("tests._dist:train_runs", payload, nproc=2, timeout=400) == [[0, 0]] * 2
    from mmscale.export.convert import convert
    for name in runs:
        assert cli_main(["export-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf"),
                         "--tokenizer", str(tok)]) == 0
        convert(tmp_path / name, tmp_path / f"{name}-export", tokenizer=tok, progress=False)
        ref, _ = load_export(tmp_path / f"{name}-export")
        hf = _hf(tmp_path / f"{name}-hf")
        ids = torch.randint(0, VOCAB, (2, ref.config.n_ctx))
        with torch.no_grad():
            assert (hf(ids).logits - ref(ids)).abs().max().item() <= 1e-5, name
    # the sentence-transformers pooling token defaults to the run's retrieval.position
    assert json.loads((tmp_path / "zero3-hf" / "1_Pooling" / "config.json").read_text())["position"] == -2
    # (the fsdp2 run keeps the default retrieval.position, mean since issue 29)
    assert json.loads((tmp_path / "fsdp2-hf" / "1_Pooling" / "config.json").read_text())["position"] == "mean"


def test_cli_and_errors(exports, tmp_path, capsys):
    src, _ = exports["flat"]
    assert cli_main(["export-hf", str(src), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "MaskedMixerForCausalLM" in out and "-> OK" in out
    assert cli_main(["export-hf", str(src), str(tmp_path / "a")]) == 1  # exists
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and "\n" not in err
    # a bf16 export stays bf16, and its logits are the bf16 weights' logits
    from safetensors.torch import load_file
    ref, meta = load_export(src)
    save_export(tmp_path / "bf16", {k: v.bfloat16() for k, v in ref.state_dict().items()}, ref.config,
                src / "tokenizer.model")
    assert cli_main(["export-hf", str(tmp_path / "bf16"), "--out", str(tmp_path / "bf16-hf")]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "bf16-hf" / "model.safetensors")).values()} == {torch.bfloat16}
    capsys.readouterr()
    assert cli_main(["export-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export-hf", str(src), "--position", "middle", "--out", str(tmp_path / "c")]) == 1
    assert "'last', 'mean' or an integer" in capsys.readouterr().err
    # a bidirectional transformer has no LlamaForCausalLM
    from mmscale.models import build_model
    cfg = ModelConfig(kind="transformer", d_model=16, n_layers=1, n_ctx=8, vocab_size=VOCAB, heads=2,
                      bidirectional=True)
    save_export(tmp_path / "bi-llama", build_model(cfg).state_dict(), cfg, exports["flat"][0] / "tokenizer.model")
    assert cli_main(["export-hf", str(tmp_path / "bi-llama"), "--out", str(tmp_path / "d")]) == 1
    assert "bidirectional transformer" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_core_import_path_does_not_import_the_ecosystem():
    code = ("import sys\nimport mmscale, mmscale.cli, mmscale.export, mmscale.export.hf, mmscale.data.tokenizer, "
            "mmscale.data.prepare, mmscale.retrieval.embedder, mmscale.models\n"
            "print(sorted(m for m in ('transformers', 'tokenizers', 'sentence_transformers', 'lm_eval') "
            "if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers as `mmscale prepare` input

def _byte_bpe(corpus_text: Path, vocab: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus_text)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_prepare_accepts_hf_tokenizers(corpus, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.tokenizer import load_tokenizer
    from mmscale.fsutil import file_sha256

    text, _, _ = corpus
    tok = _byte_bpe(text)
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = Path(text).read_text().split("<|endoftext|>")
    expected_tokens = sum(len(tok.encode(d.strip("\n"), add_special_tokens=False).ids) for d in docs if d.strip())

    def run(tokenizer, name, **kw):
        kw.setdefault("workers", 1)
        return prepare(PrepareOptions(inputs=[str(text)], tokenizer=str(tokenizer), n_ctx=32,
                                      out=str(tmp_path / name), progress=False, **kw))

    m = run(tmp_path / "tokenizer.json", "from_file")
    t = m["tokenizer"]
    assert t["kind"] == "huggingface" and t["sha256"] == file_sha256(tmp_path / "tokenizer.json")
    assert m["vocab_size"] == t["vocab_size"] == tok.get_vocab_size() and m["dtype"] == "uint16"
    assert t["eos_id"] == tok.token_to_id("<|endoftext|>") and t["pad_value"] == t["eos_id"]
    assert m["source_tokens"] == expected_tokens
    # the dataset's tokenizer loads back (every mmscale reader looks for tokenizer.model) and round-trips
    back = load_tokenizer(tmp_path / "from_file" / "tokenizer.model")
    assert back.encode("Once upon a time") == tok.encode("Once upon a time").ids
    assert back.decode(back.encode(" x  y\n")) == " x  y\n" and back.eos_id() == t["eos_id"]
    # a folder AutoTokenizer loads: same tokens, EOS from its tokenizer_config.json
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "folder"))
    m2 = run(tmp_path / "folder", "from_folder", workers=2)
    assert m2["source_tokens"] == expected_tokens and m2["tokenizer"]["eos_id"] == t["eos_id"]
    assert m2["splits"] == m["splits"]
    # a vocabulary that does not fit the token dtype: one line
    from tokenizers import Tokenizer, models, pre_tokenizers
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"</s>": 70_000}, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(UserError, match=r"vocab \(70001\) does not fit --dtype uint16") as e:
        run(tmp_path / "big.json", "big", dtype="uint16")
    assert "\n" not in str(e.value) and not (tmp_path / "big").exists()
    # and an export trained on such data ships the tokenizer.json itself
    from mmscale.export.hf import export_hf
    from mmscale.models import build_model
    cfg = ModelConfig(d_model=16, n_layers=1, n_ctx=16, vocab_size=m["vocab_size"], heads=1)
    save_export(tmp_path / "exp", build_model(cfg).state_dict(), cfg, tmp_path / "from_file" / "tokenizer.model")
    export_hf(tmp_path / "exp", tmp_path / "exp-hf")
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "exp-hf"), trust_remote_code=True)
    for s in TEXTS:
        assert auto(s)["input_ids"] == back.encode(s) and auto.decode(auto(s)["input_ids"]) == s


# ---------------------------------------------------------------------------------------------
# an external reference: llama2.c's stories260K, imported, exported to HF, generating its published story

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "stories260K"


@pytest.mark.shared_data
@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                    reason=f"{STORIES} is absent: the real llama2.c checkpoint exists only where ../shared/data does")
def test_stories260k_as_native_llama_tells_llama2c_story(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mmscale.export.hf import export_hf

    tool = Path(__file__).resolve().parents[1] / "tools" / "import_llama2c.py"
    r = subprocess.run([sys.executable, str(tool), str(STORIES / "stories260K.bin"), "--tokenizer",
                        str(STORIES / "tok512.model"), "--out", str(tmp_path / "exp")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    export_hf(tmp_path / "exp", tmp_path / "hf")  # its sentencepiece model squeezes whitespace: converted too
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)  # from llama2.c's BOS (id 1)
    text = tok.decode(out[0, 1:], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in "
                           "the park."), text


# ---------------------------------------------------------------------------------------------
# issue 23: what a new user of the HF folder meets (gradient checkpointing, modes, provenance, card, config)

@pytest.mark.parametrize("kind", ["flat", "multihead_k3"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients(exports, kind):
    """gradient_checkpointing_enable() is accepted, each block runs again in the backward pass, and the
    gradients are those without it."""
    _, hf_dir = exports[kind]
    ids = _ids(2)
    grads, calls = [], []
    for enable in (False, True):
        hf = _hf(hf_dir).train()
        if enable:
            hf.gradient_checkpointing_enable()
            assert hf.is_gradient_checkpointing
        n = [0]
        for block in hf.model.blocks:
            block.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        hf(ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in hf.named_parameters() if p.grad is not None})
        calls.append(n[0])
    assert calls == [2, 4]  # 2 blocks, each forward twice under checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k


def test_trainer_with_gradient_checkpointing_steps_the_mixer(exports, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, hf_dir = exports["flat"]
    hf = _hf(hf_dir).train()
    before = hf.model.blocks[0].mixing.weight.detach().clone()
    data = [{"input_ids": row, "labels": row} for row in _ids(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                             gradient_checkpointing=True, report_to=[], save_strategy="no", use_cpu=True,
                             learning_rate=1e-2, logging_strategy="no", dataloader_num_workers=0)
    Trainer(model=hf, args=args, train_dataset=data).train()
    assert hf.is_gradient_checkpointing
    after = hf.model.blocks[0].mixing.weight.detach()
    assert not torch.equal(before, after)
    assert torch.equal(after.triu(1), torch.zeros_like(after.triu(1)))  # the causal half never moves


def _prepared_like(root: Path, index_text: str) -> Path:
    """The files training_data_record reads from a `mmscale prepare` folder (manifest + split indexes)."""
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"format": "mmscale-mds", "splits": {"train": {"tokens": 12345}}}))
    for split in ("train", "val"):
        (root / split).mkdir()
        (root / split / "index.json").write_text(index_text + split)
    return root


def test_hf_folder_modes_provenance_card_config(exports, tmp_path):
    """Under umask 022 every file is 0644 and every folder 0755 (model.safetensors was 0600); the published
    json names the training data and its content hash, not a local path; the card has the data, tokens,
    paper, project, pipeline_tag and window; a flat mixer's config does not repeat model.heads; the config's
    bos_token_id is not the EOS id (the tokenizer declares no BOS)."""
    import hashlib
    import stat

    from mmscale.export.hf import export_hf
    from mmscale.models import build_model

    tok = exports["flat"][0] / "tokenizer.model"
    data = _prepared_like(tmp_path / "private" / "where" / "stories-v1", "shards-a-")
    cfg = ModelConfig(kind="mixer", d_model=16, n_layers=1, n_ctx=N_CTX, vocab_size=VOCAB, heads=4, mixer="flat")
    torch.manual_seed(0)
    save_export(tmp_path / "exp", build_model(cfg).state_dict(), cfg, tok,
                info={"steps": 7, "tokens": 4096, "trained_on": str(data),
                      "source": str(tmp_path / "runs" / "r1" / "checkpoints" / "step_00000007")})
    old = os.umask(0o022)
    try:
        summary = export_hf(tmp_path / "exp", tmp_path / "hf")
    finally:
        os.umask(old)
    assert summary["verify"]["ok"]
    hf_dir = tmp_path / "hf"
    for p in [hf_dir, *hf_dir.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
    published = (hf_dir / "mmscale_export.json").read_text()
    assert str(tmp_path) not in published and "private" not in published
    rec = json.loads(published)
    h = hashlib.sha256()  # by hand: manifest, then the split indexes in name order
    for rel in ("manifest.json", "train/index.json", "val/index.json"):
        h.update(rel.encode() + b"\0" + (data / rel).read_bytes() + b"\0")
    assert rec["training_data"]["name"] == "stories-v1"
    assert rec["training_data"]["content_hash"] == "sha256:" + h.hexdigest()
    assert rec["training_data"]["tokens"] == 12345 and rec["source"] == "r1/step_00000007"
    # the hash follows the content, not the place
    from mmscale.export.format import training_data_record
    moved = (tmp_path / "elsewhere").joinpath("stories-v1")
    moved.parent.mkdir()
    data.rename(moved)
    assert training_data_record(moved)["content_hash"] == rec["training_data"]["content_hash"]
    (moved / "train" / "index.json").write_text("shards-b-train")
    assert training_data_record(moved)["content_hash"] != rec["training_data"]["content_hash"]
    card = (hf_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert "pipeline_tag: text-generation" in front and "library_name: transformers" in front
    for needle in ("stories-v1", rec["training_data"]["content_hash"], "12,345", "4,096", "arxiv.org/abs/2409.01482",
                   "mmscale", f"fixed at {N_CTX} tokens"):
        assert needle in card, needle
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["mixer"] == "flat" and config["heads"] == 1
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] == 3 and config.get("bos_token_id") is None and gen.get("bos_token_id") is None
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] is None


def test_llama_config_has_no_bos_standing_in_for_eos(exports):
    _, hf_dir = exports["llama"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["eos_token_id"] is not None and config.get("bos_token_id") is None
    card = (hf_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and f"trained at {N_CTX} tokens" in card


# ---------------------------------------------------------------------------------------------
# transformers 5 (the GPU image's and current users'): a throwaway venv, since make setup pins 4.x

_TF5_CHECK = r'''
import json, sys, torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
ref = torch.load(sys.argv[1])
res = {"transformers": transformers.__version__}
for kind, r in ref["kinds"].items():
    m = AutoModelForCausalLM.from_pretrained(r["dir"], trust_remote_code=True).eval()
    with torch.no_grad():
        out = {"max_abs_diff": max((m(r["ids"][:, :n]).logits - want).abs().max().item()
                                   for n, want in r["logits"].items())}
    tok = AutoTokenizer.from_pretrained(r["dir"], trust_remote_code=True)
    out["tokenizer"] = type(tok).__name__
    out["tokens_equal"] = [tok.encode(t, add_special_tokens=False) for t in ref["texts"]] == r["text_ids"]
    if r["causal"]:
        out["generate"] = m.generate(r["ids"][:1, :5], max_new_tokens=4, do_sample=False)[0].tolist()
    if kind != "llama":
        m.train()
        m.gradient_checkpointing_enable()
        m(r["ids"], labels=r["ids"]).loss.backward()
        out["grad_ckpt"] = bool(m.is_gradient_checkpointing) and all(
            p.grad is not None for p in m.parameters() if p.requires_grad)
    res[kind] = out
print("RESULT " + json.dumps(res))
'''


def _transformers5_venv() -> Path:
    """A venv without system site-packages: this torch (the CPU wheel from local disk), then transformers 5.x
    constrained to it. Kept between runs (a stamp holds what it was made with): ~200 s to make on a 2-core
    machine, the check itself ~30 s."""
    venv = Path(os.environ.get("MMSCALE_TF5_VENV") or Path.home() / ".cache" / "mmscale" / "venv-transformers5")
    torch_pin = torch.__version__.split("+")[0]
    stamp = venv / ".mmscale-tf5"
    if stamp.is_file() and stamp.read_text() == torch_pin:
        return venv
    import shutil
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={torch_pin}"], check=True, timeout=900)
    (venv / "constraints.txt").write_text(f"torch=={torch_pin}\n")
    subprocess.run(pip + ["-c", str(venv / "constraints.txt"), "transformers>=5,<6"], check=True, timeout=900)
    stamp.write_text(torch_pin)
    return venv


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMSCALE_TEST_TF5") != "1",
                    reason="makes a transformers 5 venv (~200 s the first time): MMSCALE_TEST_TF5=1 runs it")
def test_exports_load_and_match_under_transformers_5(exports, corpus, tmp_path):
    """The folders written here (transformers 4.x) load under transformers 5 with the same logits (mixer remote
    code, native Llama), the same token ids, generate, and gradient checkpointing."""
    venv = _transformers5_venv()
    _, _, sp = corpus
    texts = TEXTS[:8]
    kinds = {}
    for kind, (src, hf_dir) in exports.items():
        ref, _ = load_export(src)
        ids = _ids(2)
        with torch.no_grad():
            kinds[kind] = {"dir": str(hf_dir), "ids": ids, "logits": {n: ref(ids[:, :n]) for n in (N_CTX, 11)},
                           "causal": kind in CAUSAL,
                           "text_ids": [sp.encode(t) for t in texts]}
    torch.save({"kinds": kinds, "texts": texts}, tmp_path / "ref.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # remote code modules cached per run, not in the user's cache
    p = subprocess.run([str(venv / "bin" / "python"), "-c", _TF5_CHECK, str(tmp_path / "ref.pt")], env=env,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert res["transformers"].startswith("5."), res
    for kind in KINDS:
        r = res[kind]
        assert r["max_abs_diff"] <= 1e-5, (kind, r)
        assert r["tokens_equal"], (kind, r)
        if kind in CAUSAL:
            assert len(r["generate"]) == 9, (kind, r)
        if kind != "llama":
            assert r["grad_ckpt"], (kind, r)
