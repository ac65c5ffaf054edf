"""What "steps" means, in the CLI and the nodes alike: how many steps a command or a node runs,
counted from the state it starts from. An EM Token Step given a state at step 400 and steps=200
ends at 600, and `learn --steps 200` on an OUT that holds a finished 400-step run ends at 600
too; a new run starts from 0. A run stopped before its end (Ctrl-C, Cancel, a crash, a
non-finite loss) is finished by running the same thing again: the command then counts from the
step its stopped run started from (recorded in the state as `run_from`), as a re-queued node
counts from its unchanged input.

The engine's configs keep the run's end as an absolute count (`LearnConfig.steps`, EM steps
after warm-up; `FinetuneConfig.steps`, fine-tune steps), which is what `learn` and `finetune`
run up to; the functions here turn the user's "steps" into that end.
"""
from __future__ import annotations

FINISHED = frozenset({"done", "loaded"})  # a run that reached its end, or a state read from a concept file


def run_span(done: int, status: str | None, run_from: int, steps: int, what: str = "steps") -> tuple[int, int]:
    """(the step the run counts from, the step it ends at) for `steps` asked of a state that has
    done `done` steps. A finished state (or none yet) starts a new run from `done`; an unfinished
    one (stopped by Ctrl-C, Cancel, a crash or a non-finite loss) is the same run going on, still
    counted from `run_from`. `what` names the input in the error for an end already passed."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{what} {steps!r}: give a whole number of steps, 0 or more")
    if status is None or status in FINISHED:
        return done, done + steps
    end = run_from + steps
    if end < done:
        raise ValueError(f"{what} {steps}: the unfinished run here started at step {run_from} and has reached "
                         f"step {done}, past the {end} that would end it; give {what} {done - run_from} or more to "
                         "finish it (the same number as before finishes it as first asked)")
    return run_from, end
