"""Stop requests from outside: SIGTERM (preemption, scancel, a launcher shutting down), SIGUSR1 (SLURM's warning
before the time limit, `--signal=B:USR1@N`) and SIGINT (Ctrl-C).

The handler only records the signal. At the next step boundary every rank learns whether any rank got one (one
collective, `StepEngine.any_rank`), then all of them save a checkpoint and the trainer exits with
EXIT_RESUMABLE, as Megatron's dist_signal_handler does. A signal that arrives during the save changes nothing:
the save completes, or the previous checkpoint stays `latest`.
"""
from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# sysexits' EX_TEMPFAIL: the run stopped early on purpose with a checkpoint; run it again (train.resume=auto)
# to continue. 0 is a finished run, 1 a non-finite stop, 2 a mistake in the config, data or launch.
EXIT_RESUMABLE = 75


class StopRequests:
    """A context that records the first stop signal in `received` (its name) instead of dying of it."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"rank {self.rank}: received {name}: stopping at the end of this step with a checkpoint",
                  file=sys.stderr, flush=True)
        else:
            print(f"rank {self.rank}: received {name} again: already stopping with a checkpoint (after "
                  f"{self.received})", file=sys.stderr, flush=True)
