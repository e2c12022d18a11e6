"""What an engine needs to read a checkpoint's files, apart from the checkpoint protocol (mmscale/run/checkpoint.py):
the layout names, meta.json, and loading third-party formats that pickle without running code.

Its own module, outside run/, so that the dependency runs one way: run/checkpoint.py -> engines (each engine checks
whether it can resume a checkpoint) -> checkpoint_format, and no engine imports run/ (the loop's package).
"""
from __future__ import annotations

import contextlib
import enum
import importlib
import io
import json
import os
import pickle
import re
from pathlib import Path

import torch

from mmscale.errors import UserError

FORMAT = "mmscale-checkpoint"
META = "meta.json"


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def read_meta(step_dir: str | os.PathLike) -> dict:
    """meta.json of a checkpoint folder, after checking that every file it lists exists."""
    step_dir = Path(step_dir)
    meta_path = step_dir / META
    if not meta_path.is_file():
        raise UserError(f"checkpoint '{step_dir}' has no {META} (incomplete or not an mmscale checkpoint); "
                        "point run.resume at a complete step_XXXXXXXX folder")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint '{step_dir}/{META}' is not valid JSON; resume from another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"'{step_dir}' is not an mmscale checkpoint (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    for rel in meta.get("model_files", []) + meta.get("optimizer_files", []) + meta.get("rank_files", []):
        if not (step_dir / rel).exists():
            raise UserError(f"checkpoint '{step_dir}' is missing '{rel}'; it is damaged: "
                            "resume from an earlier step folder (run.resume=PATH)")
    return meta


def pickle_problem(e: Exception) -> str:
    """The part of an unpickling error that names the refused global (or its first line)."""
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"global {m.group(1)}"
    return (text.splitlines() or [type(e).__name__])[0][:160]


# ----------------------------------------------------------------------------------------------
# third-party formats that pickle (DeepSpeed's *.pt, DCP's .metadata and non-tensor items)

ALLOWED_GLOBALS = {
    # DeepSpeed ZeRO optimizer states
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    # DCP metadata
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint._extension", "ExtensionRegistry"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


def _enum_member(cls, name):
    """What `builtins.getattr` may do in a checkpoint: name a member of an allow-listed Enum. Python 3.12 (and
    some 3.11 builds, e.g. Debian's 3.11.2) pickle an Enum member as getattr(EnumClass, 'NAME') (DeepSpeed's
    ZeroStageEnum in its optimizer files); any other use of getattr is refused, since a free getattr could
    reach attributes the allow-list never named."""
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str)
            and name in cls.__members__ and any(cls is obj for obj in _allowed_objects())):
        return cls[name]
    raise pickle.UnpicklingError(f"Unsupported call: getattr({getattr(cls, '__name__', type(cls).__name__)}, "
                                 f"{name!r}) (only members of allow-listed Enums)")


def _resolve_global(module: str, name: str):
    if (module, name) in (("builtins", "getattr"), ("__builtin__", "getattr")):
        return _enum_member
    if (module, name) in ALLOWED_GLOBALS:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    if module == "torch" and "." not in name:  # dtypes, layouts, memory formats: plain values
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} (not in mmscale's allow-list)")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _resolve_global(module, name)


class _RestrictedPickle:
    """A stand-in for the `pickle` module inside torch.distributed.checkpoint.filesystem."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    dump, dumps, HIGHEST_PROTOCOL = pickle.dump, pickle.dumps, pickle.HIGHEST_PROTOCOL

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()

    @staticmethod
    def loads(data, **kw):
        return _RestrictedUnpickler(io.BytesIO(data), **kw).load()


def _allowed_objects() -> list:
    out = []
    for module, name in sorted(ALLOWED_GLOBALS):
        try:
            obj = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
        except Exception:
            continue
        out.append(obj)
    return out


@contextlib.contextmanager
def safe_unpickling():
    """While active, `torch.load` (as DeepSpeed and DCP call it) reads with weights_only=True and the
    allow-list above, and DCP's metadata is unpickled by a restricted unpickler: a checkpoint file that
    names any other class or function fails with pickle.UnpicklingError instead of running it."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(_allowed_objects() + [(_enum_member, "builtins.getattr")]):
            return original(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)

    fs_mod = None
    try:  # lazy: torch.distributed may be missing from a torch build; then there is no DCP to guard
        import torch.distributed.checkpoint.filesystem as fs_mod
    except Exception:
        pass
    torch.load = load
    saved_pickle = getattr(fs_mod, "pickle", None)
    if saved_pickle is not None:
        fs_mod.pickle = _RestrictedPickle
    try:
        yield
    finally:
        torch.load = original
        if saved_pickle is not None:
            fs_mod.pickle = saved_pickle


def load_file(path: Path):
    """torch.load of an engine's checkpoint file, memory-mapped, under safe_unpickling (DeepSpeed's files pickle
    a few of its classes; anything else is refused unread). For the engines' offline readers."""
    try:
        with safe_unpickling():
            return torch.load(path, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        raise unsafe_payload_error(path, e) from None
    except Exception as e:  # truncated or foreign files: one clear line
        raise UserError(f"cannot read '{path}' ({type(e).__name__}); the checkpoint is damaged or incomplete: "
                        "convert an earlier step folder") from None


def unsafe_payload_error(where: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint '{where}' holds pickled objects outside mmscale's allow-list ({pickle_problem(e)}); "
                     "refused without loading them, as they could run code: use a checkpoint you trust")
