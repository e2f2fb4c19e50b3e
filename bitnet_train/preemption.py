"""Stopping a run on a scheduler's notice (SIGTERM/SIGINT): finish the step, save, exit 128+signal."""
import signal


class StopFlag:
    """SIGTERM/SIGINT (a scheduler's preemption notice) finish the step, save, then stop."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
