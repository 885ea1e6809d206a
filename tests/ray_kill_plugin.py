"""A plugin detector that kills the Ray worker it observes on, once (a worker lost mid-pass):
``--set kill_once.marker=PATH``; the worker writes its pid to PATH, then SIGKILLs itself.
It never kills outside a Ray task, so a one-process scan with it is unharmed."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from famfind.plugins import Heuristic, Options, Result


@dataclass(frozen=True)
class KillOnceOptions(Options):
    marker: str = ""  # file written (with the killed pid) before the one kill


class KillOnce(Heuristic):
    id = "kill_once"
    version = "0.1"
    needs = "activations"
    description = "kills the Ray worker it first observes a later batch on, once"
    Options = KillOnceOptions

    def start(self, ctx) -> None:
        self.batches = 0

    def observe(self, batch, ctx) -> None:
        self.batches += 1
        if not self.options.marker or self.batches < 2 or Path(self.options.marker).exists():
            return
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
            Path(self.options.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def merge(self, other: "KillOnce") -> None:
        self.batches += other.batches

    def run(self, ctx) -> Result:
        return Result()
