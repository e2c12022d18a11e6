"""The torch.profiler window of a run (log.profile_steps = [first step, number of steps], on the ranks in
log.profile_ranks) and, on CUDA, a memory snapshot of the same steps.

Files in run.dir: profile/steps_A-B/rankR.pt.trace.json (Chrome trace; `tensorboard --logdir run.dir/profile`
with the torch-tb-profiler plugin reads the same files) and, on CUDA, profile/steps_A-B/rankR.memory.pickle.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Starts before the first step of the window, stops after its last one (or at close)."""

    def __init__(self, cfg, rank: int, device, logger, start_step: int):
        self.cfg, self.rank, self.device, self.logger = cfg, rank, device, logger
        self.run_dir = Path(cfg.run.dir)
        self.profiler = None
        self.memory_history = False
        self.profile_range = None
        ps = cfg.log.profile_steps
        if ps:
            self.profile_range = (ps[0], ps[0] + ps[1] - 1)
            self._maybe_start(start_step + 1)

    def after_step(self, step: int, at_end: bool) -> None:
        if self.profiler is not None and step >= self.profile_range[1]:
            self._stop()
        if not at_end:
            self._maybe_start(step + 1)

    def _maybe_start(self, upcoming: int) -> None:
        if (self.profile_range is None or self.profiler is not None or upcoming != self.profile_range[0]
                or self.rank not in self.cfg.log.profile_ranks):
            return
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=acts, record_shapes=True, profile_memory=True)
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.memory_history = True
        self.profiler.start()

    def _stop(self) -> None:
        prof, self.profiler = self.profiler, None
        prof.stop()
        a, b = self.profile_range
        out = self.run_dir / "profile" / f"steps_{a}-{b}"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"rank{self.rank}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        files = {"trace": str(trace)}
        if self.memory_history:
            snap = out / f"rank{self.rank}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_history = False
            files["memory_snapshot"] = str(snap)
        self.logger.write(f"profiler: steps {a}-{b} -> {trace}")
        self.logger.event(b, "profile", first=a, last=b, **files)  # rank 0's logger only writes

    def close(self) -> None:
        """Stops a profiler still recording (a run that ended inside the window)."""
        if self.profiler is not None:
            self._stop()
