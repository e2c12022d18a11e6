"""A configuration you can discover (`mmscale config show|keys`, from the dataclass metadata) and one flag
convention across commands (help with defaults, --data, --out, --json [FILE], --no-progress, deprecations)."""
from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from mmscale import cli
from mmscale.cli import conventions as cli_conventions
from mmscale.config import load_config
from mmscale.cli.config import describe, show_yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def mm(capsys, monkeypatch):
    """`mmscale ARGS` in this process (no interpreter start per call): (status, stdout, stderr)."""
    monkeypatch.chdir(REPO)

    def call(*args):
        capsys.readouterr()
        try:
            rc = cli.main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err
    return call


def test_every_key_has_a_meaning_and_show_round_trips():
    entries = describe()
    assert len(entries) >= 60
    missing = [e["key"] for e in entries if not e["help"]]
    assert not missing, f"config keys without help metadata (add opt(default, help)): {missing}"
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.d_model=96", "log.wandb_tags=[a, b]"])
    text = show_yaml(cfg)
    assert yaml.safe_load(text) == cfg.to_dict()  # the output is a config file that loads back
    lines = text.splitlines()
    i = lines.index("  d_model: 96")
    comment = lines[i - 1]
    assert "width of the residual stream" in comment and "default: 64" in comment and "CHANGED" in comment
    i = lines.index("  kind: mixer")
    assert "allowed: mixer, transformer" in lines[i - 1] and "CHANGED" not in lines[i - 1]


def test_new_log_keys_are_checked_in_one_line():
    from mmscale.config import ConfigError

    for override, needle in [("log.profile_steps=[3]", "log.profile_steps must be [] or [start, count]"),
                             ("log.profile_steps=[0,2]", "start >= 1"),
                             ("log.sample_tokens=0", "log.sample_tokens must be >= 1"),
                             ("log.wandb_tags=solo", "expected a list"),
                             ("log.profile_ranks=[a]", "log.profile_ranks[0]: expected an integer")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="log.sample_prompts is empty"):
        load_config(None, ["log.sample_every=5", "log.sample_prompts=[]"])


def test_config_commands(mm):
    rc, out, _ = mm("config", "keys")
    assert rc == 0 and len(out.splitlines()) == len(describe())
    assert any(line.startswith("log.sample_every ") and "(0 = never)" in line for line in out.splitlines())
    rc, out, _ = mm("config", "keys", "log.profile")
    assert rc == 0 and [x.split()[0] for x in out.splitlines()] == ["log.profile_steps", "log.profile_ranks"]
    rc, out, err = mm("config", "keys", "nosuch")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "mmscale config keys" in err
    rc, out, _ = mm("config", "show", "--config", "configs/tiny.yaml", "train.lr=0.01")
    assert rc == 0 and yaml.safe_load(out)["train"]["lr"] == 0.01
    rc, out, err = mm("config", "show", "model.nope=1")
    assert rc == 2 and "unknown key 'model.nope'" in err
    rc, out, _ = mm("train", "--help")
    assert rc == 0 and "mmscale config keys" in out and "mmscale config show" in out


def _all_parsers():
    for name, (mod, desc) in cli.COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"mmscale {name}", description=desc,
                                         formatter_class=cli_conventions.HelpFormatter)
        importlib.import_module(mod).add_arguments(parser)
        cli_conventions.apply(name, parser)
        for p in cli_conventions._subparsers(parser):
            yield name, p


def test_every_option_has_help_and_shows_its_default():
    problems = []
    for name, p in _all_parsers():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
                continue
            label = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
            if not a.help:
                problems.append(f"{label}: no help")
            d = a.default
            shown = cli_conventions.HelpFormatter(p.prog)._get_help_string(a) or ""
            if a.option_strings and d not in (None, False, [], argparse.SUPPRESS) and "default" not in shown:
                problems.append(f"{label}: default {d!r} not shown")
        assert "%(default)" not in text
    assert not problems, problems


def test_one_spelling_for_inputs_outputs_and_progress():
    parsers = dict((p.prog, p) for _, p in _all_parsers())
    # inputs are --data everywhere (the old --input is still accepted)
    for prog in ("mmscale prepare", "mmscale tokenizer train", "mmscale eval", "mmscale representation"):
        assert "--data" in parsers[prog]._option_string_actions, prog
    assert parsers["mmscale prepare"]._option_string_actions["--input"].dest == "input"
    # outputs are --out everywhere
    for prog in ("mmscale prepare", "mmscale tokenizer train", "mmscale convert", "mmscale report",
                 "mmscale data synth"):
        assert "--out" in parsers[prog]._option_string_actions, prog
    # progress bars: --no-progress wherever there is one
    for prog in ("mmscale prepare", "mmscale train", "mmscale launch"):
        assert "--no-progress" in parsers[prog]._option_string_actions, prog


def test_deprecated_spellings_work_with_a_note(tmp_path, mm):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"story {i}: the cat sat on mat number {i}." for i in range(300)))
    rc, _, err = mm("tokenizer", "train", "--input", str(text), "--vocab-size", "320", "--out",
                          str(tmp_path / "old.model"))
    assert rc == 0 and "note: --input is deprecated; use --data" in err and (tmp_path / "old.model").is_file()
    rc, _, err = mm("tokenizer", "train", "--data", str(text), "--vocab-size", "320", "--out",
                          str(tmp_path / "new.model"))
    assert rc == 0 and "deprecated" not in err
    rc, _, err = mm("tokenizer", "train", "--input", str(text), "--vocab-size", "320", "--out",
                    str(tmp_path / "old.model"))  # fails (exists): the error alone, one line
    assert rc == 1 and "already exists" in err and len(err.strip().splitlines()) == 1, err
    # convert: OUT as a positional still works (noted); --out is the spelling; both at once is an error
    from mmscale.export import convert

    def parse(*argv):
        parser = argparse.ArgumentParser(prog="mmscale convert")
        convert.add_arguments(parser)
        conv = cli_conventions.apply("convert", parser)
        args = parser.parse_args(conv.rewrite_argv(list(argv)))
        with conv.outputs(args):
            return args.out

    assert parse("runs/a", "--out", "exports/a") == "exports/a"
    assert parse("runs/a", "exports/a") == "exports/a"
    from mmscale.errors import UserError
    with pytest.raises(UserError, match="give only --out"):
        parse("runs/a", "exports/a", "--out", "exports/b")
    with pytest.raises(UserError, match="pass --out"):
        parse("runs/a")


def test_json_prints_or_writes_a_file(tmp_path, capsys, mm):
    # a flag command (model-info): --json prints, --json FILE writes
    rc, out, _ = mm("model-info", "--json", "model.d_model=128")
    assert rc == 0 and json.loads(out)
    rc, out, _ = mm("model-info", "--json", str(tmp_path / "m.json"), "model.d_model=128")
    assert rc == 0 and out == "" and json.loads((tmp_path / "m.json").read_text()) == json.loads(
        mm("model-info", "--json", "model.d_model=128")[1])
    # a FILE command (eval/representation style): bare --json prints the file it would have written
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE")
    conv = cli_conventions.apply("eval", parser)
    for argv, to_file in ((["--json"], False), (["--json", str(tmp_path / "e.json")], True)):
        args = parser.parse_args(argv)
        with conv.outputs(args):
            Path(args.json).write_text(json.dumps({"loss": 1.5}))
        printed = capsys.readouterr().out
        assert (json.loads(printed) if not to_file else json.loads((tmp_path / "e.json").read_text())) == {"loss": 1.5}
    # --no-progress is log.progress=false for the training commands
    from mmscale.run import train as train_mod
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    conv = cli_conventions.apply("train", parser)
    args = parser.parse_args(conv.rewrite_argv(["train.max_steps=3", "--no-progress", "train.lr=0.1"]))
    with conv.outputs(args):
        assert load_config(None, args.overrides).log.progress is False
