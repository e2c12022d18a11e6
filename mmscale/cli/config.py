"""`mmscale config show|keys`: the configuration, discoverable from the command line.

    mmscale config keys                                  # every key: type, default, allowed values, meaning
    mmscale config keys log                              # one section (or a key prefix such as log.sample)
    mmscale config show --config configs/tiny.yaml model.d_model=128
        # the resolved config as YAML; above each key a comment with its meaning, allowed values and default
        # (and "changed" where the value is not the default); the output loads back as a config file

The text comes from the dataclasses in mmscale/config.py (each field's `help` and `allowed` metadata),
the one place where a key is described.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

import yaml

from mmscale.config import Config, ConfigError, load_config


def _allowed(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(str(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true, false"
    if meta.get("allowed"):
        return meta["allowed"]
    return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "choice"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def describe(root: type = Config, prefix: str = "") -> list[dict]:
    """One entry per key: {"key", "section", "type", "default", "allowed", "help"}, in declaration order; a field
    that is itself a dataclass is a section whose keys are listed under it (the run config, an experiment spec)."""
    out = []
    default = root()
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, key + ".")
            continue
        meta = dict(f.metadata)
        out.append({"key": key, "section": key.split(".")[0], "type": _type_name(tp),
                    "default": getattr(default, f.name), "allowed": _allowed(tp, meta), "help": meta.get("help", "")})
    return out


def section_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


def show_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key preceded by a comment: meaning; allowed; default (changed)."""
    entries = {e["key"]: e for e in describe()}
    sections = section_help()
    lines = ["# resolved mmscale config (mmscale config show); every key: `mmscale config keys`"]
    for sec, values in cfg.to_dict().items():
        lines.append(f"{sec}:" + (f"  # {sections[sec]}" if sections.get(sec) else ""))
        for key, value in values.items():
            e = entries.get(f"{sec}.{key}", {"help": "", "allowed": "", "default": value})
            parts = [e["help"] or "(no description)"]
            if e["allowed"]:
                parts.append(f"allowed: {e['allowed']}")
            parts.append(f"default: {_yaml_value(e['default'])}")
            if value != e["default"]:
                parts.append("CHANGED")
            lines.append(f"  # {'; '.join(parts)}")
            lines.append(f"  {key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def keys_table(prefix: str = "", root: type = Config, what: str = "config") -> str:
    """The keys of `root` (a config or an experiment spec) starting with `prefix`: default, meaning, allowed."""
    rows = [e for e in describe(root) if not prefix or e["key"] == prefix
            or e["key"].startswith(prefix.rstrip(".") + ".") or e["key"].startswith(prefix)]
    if not rows:
        command = "mmscale config keys" if what == "config" else "mmscale experiment keys"
        raise ConfigError(f"no {what} key starts with '{prefix}'; sections: "
                          + ", ".join(f.name for f in dataclasses.fields(root)) + f" ({command} lists all)")
    w_key = max(len(r["key"]) for r in rows)
    w_def = min(24, max(len(_yaml_value(r["default"])) for r in rows))
    out = []
    for r in rows:
        allowed = f" [{r['allowed']}]" if r["allowed"] else ""
        out.append(f"{r['key']:<{w_key}}  {_yaml_value(r['default']):<{w_def}}  {r['help']}{allowed}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("show", help="print the resolved config as YAML, each key with its meaning and default")
    s.add_argument("--config", default=None, help="YAML config (the built-in defaults when omitted)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512 engine.kind=fsdp")
    k = sub.add_parser("keys", help="list every key: default, meaning, allowed values")
    k.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. log or train.lr")
    k.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        print(show_yaml(load_config(args.config, args.overrides)), end="")
        return 0
    if getattr(args, "json", False):
        rows = [e for e in describe() if e["key"].startswith(args.prefix)]
        if not rows:
            keys_table(args.prefix)  # raises the one-line error
        print(json.dumps(rows, indent=1))
        return 0
    print(keys_table(args.prefix))
    return 0
