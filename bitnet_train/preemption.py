"""Stopping a run on a scheduler's notice or a user's signal: finish the step, save, exit 128+signal."""
import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# SIGUSR1 is the SLURM script's preemption notice (launch/slurm/train.sbatch); SIGTERM and SIGINT
# are a user's scancel / kill / Ctrl-C, and a scheduler's last word before SIGKILL.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    """Records the first stop signal; the loop finishes its step, saves and stops.

    A signal may reach some ranks only (a launcher that forwards it to its own children, one node
    that heard first), so the loop asks `should_stop` at the same point of every step: every rank
    gets the same answer and all save the same step. Later signals are logged and ignored, also
    after the `with` block, so a launcher's second SIGTERM cannot kill the save or the exit.
    """

    def __init__(self):
        self.heard: int | None = None  # the first signal this process received
        self._agreed: int | None = None  # the signal all ranks act on, once should_stop said so
        self._previous = {}

    @property
    def signum(self) -> int | None:
        return self._agreed or self.heard

    def __enter__(self):
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.heard is None:
            self.heard = signum
            log.warning("received %s: finishing this step, then saving and stopping", signal.Signals(signum).name)
        else:
            log.warning("received %s while stopping: ignored, the save goes on (SIGKILL aborts it)",
                        signal.Signals(signum).name)

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
        if self.signum is not None:
            return  # stopping: keep ignoring further signals until the process exits
        for s, handler in self._previous.items():
            signal.signal(s, handler)
