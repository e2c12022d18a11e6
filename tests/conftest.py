"""Session-wide test hygiene: streaming's /dev/shm segments and lock files must not outlive the suite.

mosaicml-streaming creates nine /dev/shm segments per dataset (`NNNNNN_locals`, `NNNNNN_barrier`,
...) and lock files in the temp dir, and never deletes them itself (mmscale's loader does, in
`close()`). This session fixture
  - points TMPDIR (and `tempfile.tempdir`) at a private directory under pytest's basetemp, so every
    lock file and temp dir our tests (and the processes they start) make is ours by location
    (mmscale's loader keeps its lock files next to the data, which tests keep under basetemp too);
  - at the end, finds what is ours and survived: lock files left in that directory (our /tmp), and
    /dev/shm segments that appeared during the session and belong to a dataset of ours (its
    `_locals` segment names a path under basetemp, or its prefix has a lock file under basetemp);
  - removes exactly those and fails the session, listing them.
It never looks at segments that existed before the session or that belong to another program.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from tests._hostile import world  # noqa: F401  (session: built once for every hostile-input test file)

SHM_DIR = Path("/dev/shm")
_STREAMING_SEGMENT = re.compile(
    r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
    r"epoch_shape|epoch_data)$")
_STREAMING_LOCK = re.compile(r"^(\d{6})_(barrier_filelock|cache_filelock)$")


def _streaming_segments() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if _STREAMING_SEGMENT.match(p.name)}


def _our_leftovers(before: set[str], basetemp: Path, tmpdir: Path) -> tuple[list[Path], list[str]]:
    # lock files in the session TMPDIR stand for /tmp: none may survive. The loader keeps its own
    # next to the data (test dirs under basetemp, removed with them); those only tell which
    # segment prefixes were ours.
    all_locks = [p for p in basetemp.rglob("*") if p.is_file() and _STREAMING_LOCK.match(p.name)]
    locks = [p for p in all_locks if tmpdir in p.parents]
    our_prefixes = {_STREAMING_LOCK.match(p.name).group(1) for p in all_locks}
    new = _streaming_segments() - before
    marker = str(basetemp).encode()
    for name in new:
        m = _STREAMING_SEGMENT.match(name)
        if m.group(2) == "locals":
            try:
                if marker in (SHM_DIR / name).read_bytes():
                    our_prefixes.add(m.group(1))
            except OSError:
                pass
    segments = sorted(n for n in new if _STREAMING_SEGMENT.match(n).group(1) in our_prefixes)
    return locks, segments


@pytest.fixture(scope="session", autouse=True)
def streaming_hygiene(tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp().resolve()
    tmpdir = basetemp / "session-tmp"
    tmpdir.mkdir(exist_ok=True)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(tmpdir)
    # mmscale's own cache (token_mix's measured auto choice) stays inside the session, not in ~/.cache
    os.environ.setdefault("MMSCALE_CACHE_DIR", str(tmpdir / "mmscale-cache"))
    # engine.precision=auto (the default) picks fp32 in every test and the processes it starts, on any CPU: a
    # test that only exercises a path must not run 10-70x slower on a CPU without native bf16 (AVX2-only EPYC)
    # nor differ between CPUs; tests whose subject is bf16 set engine.precision=bf16 (mmscale/precision.py)
    saved_auto = os.environ.get("MMSCALE_AUTO_PRECISION")
    os.environ["MMSCALE_AUTO_PRECISION"] = "fp32"
    tempfile.tempdir = str(tmpdir)
    before = _streaming_segments()
    yield tmpdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
    tempfile.tempdir = saved_tempdir
    if saved_auto is None:
        os.environ.pop("MMSCALE_AUTO_PRECISION", None)
    else:
        os.environ["MMSCALE_AUTO_PRECISION"] = saved_auto
    locks, segments = _our_leftovers(before, basetemp, tmpdir)
    for p in locks:
        p.unlink(missing_ok=True)
    for name in segments:
        (SHM_DIR / name).unlink(missing_ok=True)
    if locks or segments:
        pytest.fail("streaming state outlived the tests (removed now; a loader was not closed?): "
                    + ", ".join([f"/dev/shm/{n}" for n in segments] + [str(p) for p in locks]),
                    pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine spinning threads cost 5-10x.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# what launchers and process groups read from the environment: a test that leaves one of these set (an
# in-process run that exported its rendezvous, a loader left open) would change what later tests see, e.g.
# make lm-eval's accelerate believe it runs distributed; each test gets back the environment it started with
_WORLD_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_RANK", "ROLE_RANK")


@pytest.fixture(autouse=True)
def world_env_hygiene(request):
    before = {k: os.environ.get(k) for k in _WORLD_KEYS}
    yield
    changed = [k for k in _WORLD_KEYS if os.environ.get(k) != before[k]]
    for k in changed:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    if changed:
        import warnings

        warnings.warn(f"{request.node.nodeid} left {', '.join(changed)} changed in os.environ (restored)")
