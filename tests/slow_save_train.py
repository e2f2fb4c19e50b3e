"""`bitnet-train` whose checkpoint saves first write their step to $SAVE_STARTED and take 2 s more,
so that a test can signal a process that is inside a save (tests/test_preemption.py)."""
import os
import sys
import time
from pathlib import Path

from bitnet_train import checkpoint
from bitnet_train.cli import main

original_save = checkpoint.Checkpointer.save


def slow_save(self, step, *args, **kwargs):
    Path(os.environ["SAVE_STARTED"]).write_text(str(step))
    time.sleep(2)
    return original_save(self, step, *args, **kwargs)


checkpoint.Checkpointer.save = slow_save
sys.exit(main())
