"""`mmscale export-hf SOURCE OUT`: an export (or a checkpoint) -> a Hugging Face model folder.

    mmscale export-hf exports/mixer exports/mixer-hf                 # from a `mmscale convert` export
    mmscale export-hf runs/ret exports/ret-hf --position -2          # from a run dir (converted on the way)

The masked mixer becomes a `PreTrainedModel` + `PretrainedConfig` pair whose modeling file
(modeling_mmscale_mixer.py: torch and transformers only, no mmscale) is written into the folder and
named in config.json's `auto_map`, so it loads with `trust_remote_code=True`. The Llama-style
baseline becomes a native `LlamaForCausalLM` (no remote code): mmscale's attention already uses HF's
rotate-half RoPE layout and its grouped-query head order (query head h reads kv head h // group),
so the weights map one to one (the tests compare logits). The folder also holds

  - the tokenizer as HF files: tokenizer.json built from the sentencepiece model (normaliser, word
    splitting, BPE merges or unigram scores, byte fallback and decoder that reproduce sentencepiece;
    checked against it on probe texts before anything is written), tokenizer_config.json
    (PreTrainedTokenizerFast over that tokenizer.json, no BOS: mmscale's data has none, a document
    starts after an EOS),
    and tokenizer.model; an HF tokenizer (tokenizer.json) is copied as it is;
  - generation_config.json (EOS stops, the mixer's max_length is its window);
  - modules.json, sentence_bert_config.json and 1_Pooling/ with mmscale_pooling.py, so that
    `SentenceTransformer(OUT, trust_remote_code=True)` embeds as `mmscale.Embedder` does (the same
    token, --position, and L2 normalisation).

transformers, tokenizers and sentencepiece are imported here only, when the command runs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmscale.cli.conventions import check_output_path
from mmscale.data.tokenizer import is_hf_tokenizer_file, load_tokenizer
from mmscale.retrieval.embedder import parse_position
from mmscale.errors import UserError
from mmscale.export.convert import convert, resolve_checkpoint
from mmscale.export.format import CONFIG, FORMAT, load_export, load_export_config, training_data_record
from mmscale.fsutil import apply_umask_tree
from mmscale.run import checkpoint as ckpt

MIXER_MODELING = "modeling_mmscale_mixer.py"
POOLING = "mmscale_pooling.py"
_HERE = Path(__file__).resolve().parent

# texts the converted tokenizer must encode and decode exactly as sentencepiece does
PROBE_TEXTS = [
    "Once upon a time, there was a little girl named Lily.", " leading space", "two  spaces   three",
    "trailing ", "trailing  ", "line\nbreak\n\nblank\n", "\n", " ", "  ", "a\n b\n  c", "tabs\tand\t\ttabs",
    "digits 12345 and 3.14159", "unicode é ü ß 漢字 🙂 ∑", "Hello,World!? (quotes) \"x\" 'y' -- ok...",
    "\u2581 marker \u2581\u2581 twice", "MiXeD CaSe WORDS", "x" * 64, "",
]


def _require_hf():
    # transformers and tokenizers are the optional `ecosystem` extra and slow to import: every use in this module
    # is inside a function, after this check (the core import path never loads them; test_hf_export checks it)
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("export-hf needs transformers and tokenizers; install them with "
                        "`pip install -e .[ecosystem]` (or `make setup`)") from None


# ---------------------------------------------------------------------------------------------
# tokenizer: sentencepiece model -> tokenizer.json

def sentencepiece_to_tokenizers(model_path: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes and decodes as the sentencepiece model does.

    Supports sentencepiece BPE and unigram models with the identity normaliser (mmscale's tokenizers,
    Llama's): dummy prefix, spaces as U+2581, words split where a run of U+2581 follows other text,
    BPE merges ordered by the score of the merged piece, byte fallback. Control pieces become special
    added tokens.
    """
    # lazy: tokenizers is the optional extra, and sentencepiece's model proto needs protobuf
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except Exception:
        raise UserError(f"tokenizer '{model_path}' is not a sentencepiece model; pass a .model file") from None
    ns = proto.normalizer_spec
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        raise UserError(f"tokenizer '{model_path}' normalises text (rule {ns.name!r}); export-hf converts "
                        "identity-normalised sentencepiece models only (those of `mmscale tokenizer train`, "
                        "Llama's, Mistral's)")
    spec = proto.trainer_spec
    if spec.treat_whitespace_as_suffix:
        raise UserError(f"tokenizer '{model_path}' treats whitespace as a suffix; export-hf cannot convert it")
    piece_t = pb.ModelProto.SentencePiece
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((p.piece for p in pieces if p.type == piece_t.UNKNOWN), None)
    if spec.model_type == pb.TrainerSpec.BPE:
        mergeable = {p.piece for p in pieces if p.type == piece_t.NORMAL}
        merges = []
        for i, p in enumerate(pieces):
            if p.type != piece_t.NORMAL:
                continue
            for k in range(1, len(p.piece)):
                a, b = p.piece[:k], p.piece[k:]
                if a in mergeable and b in mergeable:
                    merges.append((-p.score, i, vocab[a], a, b))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                           byte_fallback=spec.byte_fallback, fuse_unk=True)
    elif spec.model_type == pb.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=vocab.get(unk, 0),
                               byte_fallback=spec.byte_fallback)
    else:
        raise UserError(f"tokenizer '{model_path}' is a sentencepiece {pb.TrainerSpec.ModelType.Name(spec.model_type)} "
                        "model; export-hf converts BPE and unigram models")
    tok = Tokenizer(model)
    add_prefix = ns.add_dummy_prefix
    # remove_extra_whitespaces (llama2.c's models): spaces at the ends go, runs of spaces become one
    squeeze = ([normalizers.Replace(Regex("\\A +| +\\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
               if ns.remove_extra_whitespaces else [])
    tok.normalizer = normalizers.Sequence(squeeze + ([normalizers.Prepend("\u2581")] if add_prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    # sentencepiece's SplitIntoWords: a word is a run of U+2581 followed by other characters
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    # the dummy prefix's space (all leading spaces when runs were squeezed)
                                    + ([decoders.Strip(" ", 1 << 30 if squeeze else 1, 0)] if add_prefix else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (piece_t.CONTROL, piece_t.UNKNOWN)])
    return tok


def check_tokenizer(tok, sp, texts=PROBE_TEXTS) -> None:
    """UserError unless `tok` (tokenizers) encodes and decodes every text exactly as `sp` (sentencepiece)."""
    for text in texts:
        ref = list(sp.encode(text))
        got = tok.encode(text, add_special_tokens=False).ids
        if got != ref:
            raise UserError(f"the converted tokenizer encodes {text[:40]!r} as {got[:8]} but sentencepiece gives "
                            f"{ref[:8]}; this sentencepiece model cannot be converted exactly")
        if tok.decode(got, skip_special_tokens=False) != sp.decode(ref):
            raise UserError(f"the converted tokenizer decodes {text[:40]!r} differently from sentencepiece; "
                            "this sentencepiece model cannot be converted exactly")


def _piece(sp_or_tok, idx: int):
    return None if idx is None or idx < 0 else sp_or_tok.id_to_piece(idx)


def write_tokenizer(export: Path, out: Path, meta: dict, n_ctx: int) -> dict:
    """tokenizer.json + tokenizer_config.json (+ tokenizer.model) in `out`; returns the special ids."""
    src = export / (meta.get("tokenizer") or "tokenizer.model")
    if not src.is_file():
        raise UserError(f"export '{export}' has no tokenizer; re-run `mmscale convert --tokenizer PATH`")
    tk = load_tokenizer(src)
    ids = {"eos": tk.eos_id(), "pad": tk.pad_id(), "unk": tk.unk_id(), "bos": tk.bos_id()}
    config = {
        "add_bos_token": False, "add_eos_token": False,
        # mmscale's training data has no BOS: a document starts after an EOS (lm-eval then uses EOS as prefix)
        "bos_token": None,
        "eos_token": _piece(tk, ids["eos"]), "unk_token": _piece(tk, ids["unk"]), "pad_token": _piece(tk, ids["pad"]),
        "model_max_length": n_ctx, "padding_side": "right", "clean_up_tokenization_spaces": False,
        # special tokens written in text are text, as in mmscale's tokenizer
        "split_special_tokens": True,
    }
    if is_hf_tokenizer_file(src):
        (out / "tokenizer.json").write_bytes(src.read_bytes())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        tok = sentencepiece_to_tokenizers(src)
        check_tokenizer(tok, tk)
        tok.save(str(out / "tokenizer.json"))
        shutil.copyfile(src, out / "tokenizer.model")
        # tokenizer.json as it is: transformers 5's LlamaTokenizer rebuilds the pre-tokenizer from its own
        # settings (" leading space" then loses its first piece); the generic fast class does not, in 4.x or 5.x
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {f"{k}_token": config[f"{k}_token"] for k in ("eos", "unk", "pad") if config[f"{k}_token"] is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


# ---------------------------------------------------------------------------------------------
# models

def _load_modeling(path: Path, name: str):
    """Import a template file under its own name (as transformers will import the copy in the export)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _bos(ids: dict):
    """The config's bos_token_id: the tokenizer files declare no BOS (mmscale's data has none, see
    write_tokenizer), so neither does the config; not the EOS id, which tools would then prepend as a BOS."""
    return None


def mixer_hf_config(cfg: dict, ids: dict, dtype):
    mod = _load_modeling(_HERE / "hf_modeling_mixer.py", "mmscale_hf_modeling_mixer")
    eos = ids.get("eos") if ids.get("eos", -1) >= 0 else None
    pad = ids.get("pad") if ids.get("pad", -1) >= 0 else eos
    # a flat mixer has one T x T matrix per tap whatever model.heads says (heads only shape the multihead mixer)
    heads = cfg["heads"] if cfg["mixer"] == "multihead" else 1
    config = mod.MaskedMixerConfig(
        vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_ctx=cfg["n_ctx"],
        mixer=cfg["mixer"], heads=heads, kernel_size=cfg["kernel_size"],
        ffn_hidden=cfg.get("ffn_hidden") or cfg["ffn_mult"] * cfg["d_model"], bidirectional=cfg["bidirectional"],
        final_norm=cfg["final_norm"], norm_eps=cfg["norm_eps"], init_std=cfg.get("init_std", 0.02),
        tie_word_embeddings=cfg["tie_embeddings"], pad_token_id=pad, bos_token_id=_bos(ids), eos_token_id=eos)
    config.architectures = ["MaskedMixerForCausalLM"]
    config.auto_map = {"AutoConfig": "modeling_mmscale_mixer.MaskedMixerConfig",
                       "AutoModel": "modeling_mmscale_mixer.MaskedMixerModel",
                       "AutoModelForCausalLM": "modeling_mmscale_mixer.MaskedMixerForCausalLM"}
    return mod, config


def mixer_state_to_hf(sd: dict) -> dict:
    """mmscale MaskedMixerLM keys -> MaskedMixerForCausalLM keys (the same modules under `model.`)."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in sd.items()}


def llama_hf_config(cfg: dict, ids: dict, dtype):
    from transformers import LlamaConfig  # lazy: the optional extra (_require_hf)

    if cfg["bidirectional"]:
        raise UserError("a bidirectional transformer has no LlamaForCausalLM equivalent; export-hf converts causal "
                        "transformers only")
    eos = ids.get("eos") if ids.get("eos", -1) >= 0 else None
    pad = ids.get("pad") if ids.get("pad", -1) >= 0 else None
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"],
        intermediate_size=cfg.get("ffn_hidden") or cfg["ffn_mult"] * cfg["d_model"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg.get("kv_heads") or cfg["heads"], head_dim=cfg["d_model"] // cfg["heads"],
        max_position_embeddings=cfg["n_ctx"], rms_norm_eps=cfg["norm_eps"], rope_theta=cfg["rope_theta"],
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg["tie_embeddings"],
        initializer_range=cfg.get("init_std", 0.02), bos_token_id=_bos(ids), eos_token_id=eos, pad_token_id=pad,
        architectures=["LlamaForCausalLM"])


_LLAMA_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
                "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
                "attn.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight",
                "ffn.w3.weight": "mlp.up_proj.weight"}


def llama_state_to_hf(sd: dict) -> dict:
    """mmscale LlamaLM keys -> LlamaForCausalLM keys. No permutation: both use rotate-half RoPE and the
    same grouped-query head order."""
    out = {}
    for k, v in sd.items():
        if k == "embed.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if rest not in _LLAMA_BLOCK:
                raise UserError(f"unexpected tensor '{k}' in a transformer export; re-run `mmscale convert`")
            out[f"model.layers.{i}.{_LLAMA_BLOCK[rest]}"] = v
        else:
            raise UserError(f"unexpected tensor '{k}' in a transformer export; re-run `mmscale convert`")
    return out


def _write_sentence_transformers(out: Path, d_model: int, n_ctx: int, position) -> None:
    shutil.copyfile(_HERE / "hf_pooling.py", out / POOLING)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{POOLING[:-3]}.TokenPooling"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": n_ctx, "do_lower_case": False},
                                                              indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"dimension": d_model, "position": position, "normalize": True}, indent=2) + "\n")


PAPER = "https://arxiv.org/abs/2409.01482"


def _training_data(meta: dict):
    """The export's training-data record (name + content hash; format.training_data_record), never a path."""
    rec = meta.get("training_data")
    return rec if isinstance(rec, dict) else training_data_record(meta.get("trained_on"))


def _card(cfg: dict, meta: dict, position) -> str:
    mixer = cfg["kind"] == "mixer"
    load = ("AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)" if mixer
            else "AutoModelForCausalLM.from_pretrained(PATH)   # a native LlamaForCausalLM")
    data = _training_data(meta)
    data_line = ("unknown (exported from a model with no recorded training data)" if not data else
                 f"`{data['name']}` (content hash {data.get('content_hash') or 'not available'}"
                 + (f"; {data['tokens']:,} tokens in its train split" if data.get("tokens") else "") + ")")
    tokens = meta.get("tokens")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [mmscale, " + ("masked-mixer" if mixer else "llama") + "]", "---",
        f"# mmscale {'masked mixer' if mixer else 'Llama-style transformer'} (Hugging Face format)", "",
        f"d_model {cfg['d_model']}, {cfg['n_layers']} layers, n_ctx {cfg['n_ctx']}, vocab {cfg['vocab_size']}"
        + (f"; steps {meta['steps']}" if meta.get("steps") else "")
        + (f"; validation loss {meta['val_loss']:.4f}" if isinstance(meta.get("val_loss"), (int, float)) else ""), "",
        f"- training data: {data_line}",
        f"- tokens seen in training: {tokens:,}" if isinstance(tokens, int) else "- tokens seen in training: not recorded",
        f"- window: {'fixed at' if mixer else 'trained at'} {cfg['n_ctx']} tokens"
        + (" (prompt + new tokens <= n_ctx; longer inputs are an error)" if mixer else
           " (RoPE; longer contexts were never trained)"),
        f"- architecture: " + (f"masked mixer, B. L. Badger, \"Masked Mixers for Language Generation and Retrieval\", "
                               f"arXiv 2409.01482 ({PAPER})" if mixer else "Llama-style decoder (the masked-mixer "
                               f"paper's baseline, arXiv 2409.01482: {PAPER})"),
        "- trained and exported with mmscale (a trainer for masked-mixer language models), `mmscale export-hf`", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}",
        # transformers 5 asks before it reads a folder whose config.json names remote code, tokenizer included
        f"tok = AutoTokenizer.from_pretrained(PATH{', trust_remote_code=True' if mixer else ''})", "```", "",
        "Text encodes as mmscale's tokenizer encodes it (no BOS; a document starts after an EOS).",
    ]
    if mixer:
        lines += ["The mixer's window is fixed: at most n_ctx tokens per forward, prompt + new tokens <= n_ctx.",
                  "lm-evaluation-harness reads n_ctx as its max_length."]
    lines += ["", f"sentence-transformers: `SentenceTransformer(PATH, trust_remote_code=True)` embeds at token "
              f"position {position!r}, L2-normalised, as `mmscale.Embedder`.", ""]
    return "\n".join(lines)


def export_hf(source: str | os.PathLike, out: str | os.PathLike, *, position="auto", overwrite: bool = False,
              verify: bool = True, tokenizer: str | os.PathLike | None = None) -> dict:
    """Write the HF folder for `source` (an export, or a checkpoint converted on the way); returns a summary."""
    _require_hf()
    src, out = Path(source), Path(out)
    if not src.is_dir():
        raise UserError(f"'{src}' does not exist; pass an export (mmscale convert) or a run / checkpoint folder")
    # never the source nor a folder holding it
    check_output_path(out, "--out", overwrite=overwrite, inputs=[src] + ([tokenizer] if tokenizer else []))
    try:
        is_export = (src / CONFIG).is_file() and json.loads((src / CONFIG).read_text()).get("format") == FORMAT
    except (ValueError, AttributeError):
        is_export = False  # not an export's config.json: read SOURCE as a checkpoint (which says what is wrong)
    with tempfile.TemporaryDirectory(prefix=".export-hf-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        run_position = None
        if not is_export:  # a checkpoint: convert it first (fp32)
            step = resolve_checkpoint(src)
            run_position = ((ckpt.read_meta(step).get("config") or {}).get("retrieval") or {}).get("position")
            convert(src, Path(tmp) / "export", tokenizer=tokenizer, progress=False)
            src = Path(tmp) / "export"
        if position == "auto":
            position = run_position or "last"
        parsed = parse_position(position)
        if parsed == "idf":  # its weights are the searched corpus's statistics, which no model file carries
            raise UserError("export-hf: position 'idf' weights tokens by the searched corpus's document frequencies, "
                            "which a sentence-transformers export cannot carry; pass --position mean")
        position = "last" if parsed is None else parsed
        return _export(src, out, position, overwrite, verify, Path(tmp))


def _export(src: Path, out: Path, position, overwrite: bool, verify: bool, tmp: Path) -> dict:
    meta = load_export_config(src)
    cfg = meta["model"]
    sd = load_file(str(src / "model.safetensors"))
    dtype = next(iter(sd.values())).dtype
    stage = tmp / "hf"
    stage.mkdir()
    ids = write_tokenizer(src, stage, meta, cfg["n_ctx"])
    if cfg["kind"] == "mixer":
        mod, config = mixer_hf_config(cfg, ids, dtype)
        model_cls, hf_sd = mod.MaskedMixerForCausalLM, mixer_state_to_hf(sd)
    else:
        from transformers import LlamaForCausalLM  # lazy: the optional extra (_require_hf)

        config, model_cls, hf_sd = llama_hf_config(cfg, ids, dtype), LlamaForCausalLM, llama_state_to_hf(sd)
    if cfg["tie_embeddings"]:
        hf_sd.pop("lm_head.weight", None)
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # every weight is overwritten below
        model = model_cls(config).to(dtype)  # the export's dtype (fp32 or bf16) is the folder's
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not (cfg["tie_embeddings"] and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"export '{src}' does not match its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; re-run `mmscale convert`")
    if cfg["tie_embeddings"]:
        model.tie_weights()
    model.generation_config.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                   pad_token_id=config.pad_token_id)
    if cfg["kind"] == "mixer":
        model.generation_config.update(max_length=cfg["n_ctx"], use_cache=False)
    model.save_pretrained(str(stage), safe_serialization=True)
    if cfg["kind"] == "mixer":
        shutil.copyfile(_HERE / "hf_modeling_mixer.py", stage / MIXER_MODELING)
    _write_sentence_transformers(stage, cfg["d_model"], cfg["n_ctx"], position)
    (stage / "README.md").write_text(_card(cfg, meta, position))
    source = meta.get("source")  # the checkpoint it was converted from: RUN/step_N, not the machine's path
    if source:
        parts = Path(str(source)).parts
        source = f"{parts[-3]}/{parts[-1]}" if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]
    (stage / "mmscale_export.json").write_text(json.dumps(
        {"model": cfg, **{k: meta.get(k) for k in ("steps", "tokens", "val_loss")},
         "training_data": _training_data(meta), "source": source, "embedding_position": position},
        indent=2, default=str) + "\n")
    apply_umask_tree(stage)  # the staging dir is 0700 and save_pretrained's files 0600: modes as the umask gives
    summary = {"export": str(out), "kind": cfg["kind"], "dtype": str(dtype).replace("torch.", ""),
               "position": position, "tensors": len(hf_sd)}
    if verify:
        summary["verify"] = verify_hf(stage, src)
        if not summary["verify"]["ok"]:
            raise UserError(f"the HF model's logits differ from the export's by "
                            f"{summary['verify']['max_abs_diff']:.3g}; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(stage), str(out))
    return summary


def verify_hf(hf_dir: Path, export: Path, seed: int = 0) -> dict:
    """Logits of the HF folder (loaded through AutoModelForCausalLM) against the mmscale export's."""
    from transformers import AutoModelForCausalLM  # lazy: the optional ecosystem extra (see _require_hf)

    ref_model, _ = load_export(export)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).float().eval()
    c = ref_model.config
    ids = torch.randint(0, c.vocab_size, (2, c.n_ctx), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = ref_model(ids)
        got = hf(ids).logits
    diff = (got - ref).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    return {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol}


# ---------------------------------------------------------------------------------------------
# `mmscale export-hf`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an export (mmscale convert), or a run dir / checkpoint folder")
    parser.add_argument("out", nargs="?", default=None, help="the Hugging Face folder to write (or --out)")
    parser.add_argument("--out", dest="out_opt", metavar="OUT", default=None,
                        help="the Hugging Face folder to write (must not exist)")
    parser.add_argument("--position", default="auto",
                        help="sentence-transformers embedding token: last, or an index such as -2 (the paper's); "
                             "auto = the run's retrieval.position when SOURCE is a checkpoint, else last")
    parser.add_argument("--tokenizer", help="SOURCE a checkpoint: the tokenizer to ship (default: the run's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check against the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    if args.out and args.out_opt and args.out != args.out_opt:
        raise UserError(f"two outputs given ('{args.out}' and --out '{args.out_opt}'); give only --out", 2)
    out = args.out_opt or args.out
    if not out:
        raise UserError("no output given; pass --out FOLDER", 2)
    summary = export_hf(args.source, out, position=args.position, overwrite=args.overwrite,
                        verify=not args.no_verify, tokenizer=args.tokenizer)
    kind = "MaskedMixerForCausalLM (trust_remote_code=True)" if summary["kind"] == "mixer" else "LlamaForCausalLM"
    print(f"wrote {summary['export']}: {kind}, {summary['dtype']}, {summary['tensors']} tensors, "
          f"sentence-transformers position {summary['position']!r}")
    if "verify" in summary:
        v = summary["verify"]
        print(f"verify: max |logit difference| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}) -> OK")
    return 0
