"""`cvt ARGS` under torchrun, where rank RANK of the first attempt SIGKILLs itself after optimizer step STEP:

    torchrun --max-restarts 1 ... kill_rank_after_step.py RANK STEP train ...

A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) runs `cvt ARGS` as it is, its rank 0 a few seconds late: the
other ranks then look for it first, among the addresses the killed attempt published too."""
import os
import signal
import sys
import time

from cvt import engine
from cvt.cli import main

rank, step, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
restarted = os.environ["TORCHELASTIC_RESTART_COUNT"] != "0"
if not restarted and int(os.environ["RANK"]) == rank:
    optimizer_step = engine.optimizer_step

    def optimizer_step_then_die(models, optimization, state):
        optimizer_step(models, optimization, state)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    engine.optimizer_step = optimizer_step_then_die
elif restarted and int(os.environ["RANK"]) == 0:
    time.sleep(3)
main(args)
