"""`cvt ARGS` under torchrun, where rank RANK of the first attempt SIGKILLs itself after optimizer step STEP:

    torchrun --max-restarts 1 ... kill_rank_after_step.py RANK STEP train ...

A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) runs `cvt ARGS` as it is."""
import os
import signal
import sys

from cvt import engine
from cvt.cli import main

rank, step, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and int(os.environ["RANK"]) == rank:
    optimizer_step = engine.optimizer_step

    def optimizer_step_then_die(models, optimization, state):
        optimizer_step(models, optimization, state)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    engine.optimizer_step = optimizer_step_then_die
main(args)
