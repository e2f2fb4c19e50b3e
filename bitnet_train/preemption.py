"""Stopping a run on a scheduler's notice or a user's signal: finish the step, save, exit 128+signal.

The first stop signal is recorded for the whole process and every later one is logged and
ignored: launchers and SLURM often send two, and the second must not kill the save. The CLI
listens for the scheduler's signals from start-up (`listen`), so a notice during data loading
reaches the loop's first step; Ctrl-C outside a training loop, with nothing unsaved, interrupts
at once as usual.
"""
import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# SIGUSR1 is the SLURM script's preemption notice (launch/slurm/train.sbatch); SIGTERM and SIGINT
# are a user's scancel / kill / Ctrl-C, and a scheduler's last word before SIGKILL.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_heard: list[int] = []  # the stop signals this process received, in order


def _record(signum, frame):
    name = signal.Signals(signum).name
    if _heard:
        log.warning("received %s while stopping: ignored, the save goes on (SIGKILL aborts it)", name)
    else:
        log.warning("received %s: finishing this step, then saving and stopping", name)
    _heard.append(signum)


def listen(signals=SCHEDULER_SIGNALS) -> None:
    """From now until the process exits, these signals are recorded instead of ending it."""
    for s in signals:
        signal.signal(s, _record)


class StopFlag:
    """The training loop's view of the stop signals: `with StopFlag() as stop:` around the loop,
    `stop.should_stop(accelerator)` at the same point of every step.

    A signal may reach some ranks only (a launcher that forwards it to its own children, one node
    that heard first), so `should_stop` is a collective: every rank gets the same answer at the
    same step, and all save that step.
    """

    def __init__(self):
        self._agreed: int | None = None  # the signal all ranks act on, once should_stop said so
        self._previous = {}

    @property
    def heard(self) -> int | None:
        """The first stop signal this process received (None: none yet)."""
        return _heard[0] if _heard else None

    @property
    def signum(self) -> int | None:
        return self._agreed or self.heard

    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        listen(STOP_SIGNALS)
        return self

    def should_stop(self, accelerator) -> bool:
        """Collective (call it on every rank at the same point): True on every rank once any rank
        has heard a stop signal. All ranks agree on the largest signal number heard."""
        heard = self.heard or 0
        if accelerator.num_processes > 1:
            t = torch.tensor(heard, dtype=torch.int32, device=accelerator.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            heard = int(t)
        self._agreed = heard or None
        return self._agreed is not None

    def __exit__(self, *exc):
        if self.signum is None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            return
        # Stopping: the process exits next. Ignored at the OS level, because Python resets its own
        # handlers to the default (fatal) action while it shuts down, and a launcher's second
        # SIGTERM would then turn the exit code of a clean stop into "killed by SIGTERM".
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
