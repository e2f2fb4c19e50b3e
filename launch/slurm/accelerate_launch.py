"""`accelerate launch` (same arguments) whose ranks stop cleanly on a signal.

    python launch/slurm/accelerate_launch.py --multi_gpu --num_processes 8 -m bitnet_train.cli output_dir=runs/x

Plain `accelerate launch` / torchrun answer SIGTERM by killing the ranks 30 s later (whatever
they are saving), then exit 1 with a torch elastic traceback; they die of SIGUSR1 (the SLURM
script's preemption notice) and leave the ranks running. Here a stop signal (TERM, INT, USR1)
goes to every rank at once, the launcher waits for them to finish their step and save, and a
deliberate stop (each rank exits 128+signal) ends with that code and the ranks' own one-line
message, without a traceback. Any other failure is reported as accelerate reports it.
"""
import logging
import os
import signal
import sys

import psutil
from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from bitnet_train.preemption import STOP_SIGNALS

DELIBERATE = {128 + s for s in STOP_SIGNALS}  # the exit codes of a rank that saved and stopped


def forward_to_ranks(signum, frame):
    # The ranks are this process's children (torch elastic starts each in a session of its own,
    # so a signal to our process group would not reach them).
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str]) -> int:
    # torch elastic would catch TERM/INT itself, forward them and SIGKILL the ranks 30 s later.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    for s in STOP_SIGNALS:
        signal.signal(s, forward_to_ranks)
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as failed:
        codes = {f.exitcode for f in failed.failures.values()}
        if not codes <= DELIBERATE | {0}:
            raise
        return max(codes)
    return 0


if __name__ == "__main__":
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its "worker failed" report
    sys.exit(main(sys.argv[1:]))
