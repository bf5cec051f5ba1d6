"""What the three training scripts share: resume and save with clear errors, the per-step seed, the
non-finite-loss stop, the progress line with the time left, and the names used in their logs; and
the pretraining loop's preemption signals (``StopSignal``) and learning-rate schedule (``Schedule``).

Used by ``main_vicregl.py`` (pretraining), ``evaluate.py`` (linear probe and fine-tuning) and
``segmentation/train.py`` (linear segmentation head). Every function works in one plain process and
under a process group; only rank 0 writes files.
"""
import functools
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import datasets
import utils
from models.checkpoints import CheckpointError, check_entries, read_checkpoint
from utils import UserError

# Names in stats.txt. Validation lines carry a prefix so that a reader can tell them apart; the other
# keys are those of the reference's pretraining log (evaluate.py keeps the reference evaluate.py's own
# names: epoch, step, lr_head, lr_backbone, loss, time).
VAL_PREFIX = "Val: "
EPOCH, STEP, ITERATION, LR, TIME = "ep", "st", "it", "lr", "t"
IMAGES_PER_S = "images_per_s"  # TensorBoard only


def elapsed_field(start: float) -> str:
    """Seconds since ``start`` as the 9-digit zero-padded string of the ``t`` field."""
    return f"{int(time.time() - start):09d}"


# ----------------------------------------------------------------------------- randomness

def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the model's own randomness (drop path, dropout) at ``step`` in process ``rank``:
    a resumed run replays exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2 ** 63)


# ----------------------------------------------------------------------------- stopping on a bad loss

class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run stops before the update, keeping the last checkpoint."""


def check_finite(loss: torch.Tensor, step: int, logs: Optional[Mapping[str, torch.Tensor]] = None,
                 hint: str = "lower the learning rate") -> None:
    """Raise NonFiniteLoss naming the step and the non-finite logged terms when ``loss`` is not finite.
    Reading the loss waits for the device: on GPUs call it one step late."""
    if torch.isfinite(loss):
        return
    bad = [k for k, v in (logs or {}).items() if not torch.isfinite(v)]
    terms = f" (non-finite terms: {', '.join(bad) or 'none logged'})" if logs is not None else ""
    raise NonFiniteLoss(f"the loss became {float(loss)} at step {step}{terms}; stopping. The last good "
                        f"checkpoint was kept. Try to {hint}")


# ----------------------------------------------------------------------------- progress

class Progress:
    """Throughput and time left of a loop of ``total_steps`` steps of ``images_per_step`` images each,
    shown on a terminal (``logger.progress``) at most once a second. Rates count this process's run
    only, so a resumed run does not claim the images of the run before it."""

    def __init__(self, logger: utils.JsonLogger, total_steps: int, images_per_step: int, first_step: int = 0):
        self.logger, self.total, self.images = logger, total_steps, images_per_step
        self.first, self.start, self.shown = first_step, time.time(), 0.0

    def rate(self, steps_done: int) -> float:
        """Images per second since the start."""
        return (steps_done - self.first) * self.images / max(time.time() - self.start, 1e-9)

    def scalars(self, steps_done: int) -> Dict[str, float]:
        """The numbers for TensorBoard that stats.txt does not hold: ``{"images_per_s": rate}``."""
        return {IMAGES_PER_S: self.rate(steps_done)}

    def seconds_left(self, steps_done: int) -> float:
        return (self.total - steps_done) * self.images / max(self.rate(steps_done), 1e-9)

    def show(self, steps_done: int, position: str, loss: Optional[Callable[[], float]] = None) -> None:
        """``position | img/s | loss | left`` on the terminal; ``loss`` is only called (which may wait for
        the device) when the line is drawn."""
        if not self.logger.tty or time.time() - self.shown < 1.0:
            return
        self.shown = time.time()
        parts = [position, f"{self.rate(steps_done):.1f} img/s"]
        if loss is not None:
            parts.append(f"loss {loss():.4f}")
        parts.append(f"left {utils.hms(self.seconds_left(steps_done))}")
        self.logger.progress(" | ".join(parts))


# ----------------------------------------------------------------------------- skipped files

def skipped_in_epoch(loader, before: int) -> Dict[str, int]:
    """``{"skipped_images": n}``: the unreadable files that every process skipped since ``before`` (this
    process's earlier count), for the epoch's log line; {} when there were none, so that the line keeps
    its usual keys. A collective: every process calls it."""
    n = utils.sum_over_processes(datasets.skipped_images(loader) - before)
    return {"skipped_images": n} if n else {}


# ----------------------------------------------------------------------------- checkpoints

def plain_args(args) -> Dict[str, object]:
    """The arguments as plain data for a checkpoint (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


RESUME_COUNTERS = ("epoch", "step_in_epoch", "iteration")  # the resume entries that are ints


def load_resume_state(path: Path, kind: str, required: Sequence[str], args, checked: Sequence[str],
                      trusted: bool = False) -> Optional[dict]:
    """The checkpoint at ``path`` to resume from, or None when there is none.

    It must hold the ``required`` entries, and the options named in ``checked`` must equal those it was
    saved with. Any problem is a UserError that says what differs and leaves the file untouched.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        ckpt = read_checkpoint(str(path), trusted=trusted)
    except CheckpointError as e:
        raise UserError(f"{e}. {path} was left untouched: move it away to start afresh, or use another "
                        f"--exp-dir") from None
    missing = [k for k in required if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a {kind} checkpoint (no {', '.join(missing)}); it was left untouched: "
                        f"use another --exp-dir")
    try:  # counters are ints, states and saved arguments dicts: anything else would fail later, unexplained
        check_entries(ckpt, str(path), {k: int if k in RESUME_COUNTERS else Mapping
                                        for k in (*required, "step_in_epoch", "args")})
    except CheckpointError as e:
        raise UserError(f"{e}; it was left untouched: use another --exp-dir") from None
    saved, now = ckpt.get("args") or {}, plain_args(args)
    differ = [f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in checked
              if k in saved and saved[k] != now.get(k)]
    if differ:
        raise UserError(f"{path} was written by a run with {', '.join(differ)}; it was left untouched: use "
                        f"another --exp-dir, or the same options to resume")
    return ckpt


def restore(path: Path, states: Mapping[str, Mapping], **objects) -> None:
    """``objects[name].load_state_dict(states[name])`` for every name (modules strictly); a state that
    does not fit is a UserError naming the part, and the file stays untouched."""
    for name, obj in objects.items():
        try:
            obj.load_state_dict(states[name])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} does not fit this run: its {name} state: {str(e).strip().splitlines()[0]}. "
                            f"The file was left untouched") from None


def save_state(path: Path, make_state: Callable[[], dict], main_proc: bool) -> None:
    """Rank 0 writes ``make_state()`` to ``path`` atomically; then every process learns whether that
    worked, so that a failed write (full disk, read-only folder) stops all of them with one message
    instead of leaving the others waiting. The previous file stays intact."""
    error = None
    if main_proc:
        try:
            utils.save_atomic(make_state(), str(path))
        except UserError as e:
            error = str(e)
    if utils.any_process(error is not None):
        raise UserError(error or f"process 0 could not write {path}")


# ----------------------------------------------------------------------------- step caps and time budgets

def schedule_steps(epoch_steps: int, warmup_epoch_steps: int, max_steps: int = 0) -> Tuple[int, int]:
    """(total, warmup) steps of the learning-rate schedule.

    ``epoch_steps`` and ``warmup_epoch_steps`` are those of --epochs and --warmup-epochs. A cap
    ``max_steps`` below ``epoch_steps`` compresses that schedule into ``max_steps``: the warmup keeps
    its share of the run (rounded, at least one step when there was one), and the cosine ends at the
    last step. 0 (no cap) or a cap at least ``epoch_steps`` leaves it unchanged.
    """
    if max_steps <= 0 or max_steps >= epoch_steps:
        return epoch_steps, warmup_epoch_steps
    warmup = round(warmup_epoch_steps * max_steps / max(epoch_steps, 1))
    return max_steps, max(warmup, 1) if warmup_epoch_steps > 0 else 0


class TimeBudget:
    """A time budget for a training loop whose learning-rate schedule follows the clock.

    The share of ``seconds`` used so far (``used(now) / seconds``) is the run's position in its
    schedule. A schedule sized in steps from a rate measured at the start would end too early or too
    late whenever the machine gets busier or quieter; one that follows the clock ends with the budget.
    Time counts from ``start`` (a ``time.time()`` value) plus ``used_before`` seconds of the runs this
    one resumes. Call ``tick(now)`` at the start of every step; ``done(now)`` says whether another step,
    as long as the last one, would overrun the budget.
    """

    def __init__(self, seconds: float, start: float, used_before: float = 0.0):
        self.seconds, self.start, self.used_before = seconds, start, used_before
        self.last_tick: Optional[float] = None
        self.step_s = 0.0  # duration of the last step (data loading included)

    def used(self, now: float) -> float:
        return self.used_before + now - self.start

    def tick(self, now: float) -> None:
        if self.last_tick is not None:
            self.step_s = now - self.last_tick
        self.last_tick = now

    def done(self, now: float) -> bool:
        return self.used(now) + self.step_s >= self.seconds


# ----------------------------------------------------------------------------- entry points

def entry_point(fn: Callable) -> Callable:
    """Decorator for a script's ``main``: user errors (exit status 2) and a non-finite loss (1) are
    printed as one line without a traceback, and the process group is always torn down."""
    @utils.exit_on_user_error
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        finally:
            utils.cleanup_distributed()
    return wrapper


class StopSignal:
    """Preemption: SIGTERM / SIGUSR1 (and SIGUSR2 under submitit) ask the loop to checkpoint the
    current step and stop; the loop polls ``requested`` between steps. The previous handlers are
    kept so that run_with_submitit.py can hand over to submitit's requeue afterwards."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.flag, self.signum = False, None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        # A CPU (gloo) group for the flag: agreeing on it never waits for the GPU.
        self.group = dist.new_group(backend="gloo") if utils.is_dist() else None

    def _handle(self, signum, frame):
        self.flag, self.signum = True, self.signum or signum

    def requested(self, step: int, device: torch.device) -> bool:
        if not utils.is_dist():
            return self.flag
        if step % 10:  # a collective every 10 steps: all processes stop at the same step
            return False
        return self.agree(self.flag)

    def agree_clock(self, used: float, done: bool) -> Tuple[float, bool]:
        """(process 0's ``used``, whether ``done`` holds in any process), in one collective on the CPU
        group: a --time-budget run takes its position in the schedule from one clock."""
        if self.group is None:
            return used, done
        t = torch.tensor([used if dist.get_rank() == 0 else 0.0, float(done)], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t[0]), bool(t[1] > 0)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process, on the CPU group (every process calls it at the same
        step). Decisions taken on each process's own clock, such as when to log, go through here:
        logging runs collectives, which hang when only some processes enter them."""
        if self.group is None:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, group=self.group)
        return bool(t.item() > 0)


class Schedule:
    """The learning rate of every step and the number of steps of the run.

    Without --time-budget: warmup and cosine over ``total_steps`` (--epochs' steps, compressed into
    --max-steps when that is smaller). With it, the position in the schedule of --epochs is the share of
    the budget used or of the steps done, whichever is further along, so that the cosine ends with the
    run whether the clock or --epochs ends it; --max-steps then only caps ``total_steps``, which drops to
    the current step once the budget is spent. ``args.budget_used_s`` holds the seconds used (those of the
    run that ``ckpt`` comes from included), kept up to date for model.pth.
    """

    def __init__(self, args, num_images: int, start: float, ckpt: Optional[dict],
                 agree_clock: Callable[[float, bool], Tuple[float, bool]]):
        """``num_images``: the training set's size; ``start``: time.time() at the start of the run;
        ``agree_clock``: StopSignal.agree_clock (process 0's clock for every process)."""
        self.args, self.agree_clock = args, agree_clock
        self.epoch_steps = args.epochs * num_images // args.batch_size
        self.warmup_epoch_steps = args.warmup_epochs * num_images // args.batch_size
        self.total_steps, self.warmup_steps = schedule_steps(self.epoch_steps, self.warmup_epoch_steps,
                                                                      args.max_steps)
        args.budget_used_s = ((ckpt or {}).get("args") or {}).get("budget_used_s") or 0.0
        self.clock = TimeBudget(args.time_budget * 60, start, args.budget_used_s) if args.time_budget else None

    def learning_rate(self, step: int) -> float:
        """The rate of global step ``step``. Call it once at the start of every step, before comparing
        ``step`` with ``total_steps``: with --time-budget it reads the clock (a collective), and ends the
        run at ``step`` when one more step would overrun the budget."""
        a = self.args
        if self.clock is None:
            return utils.learning_schedule(step, a.batch_size, a.base_lr, a.end_lr_ratio, self.total_steps,
                                           self.warmup_steps)
        now = time.time()
        self.clock.tick(now)
        # process 0's clock, so that every process sets the same rate
        a.budget_used_s, spent = self.agree_clock(self.clock.used(now), self.clock.done(now))
        if spent:
            self.total_steps = step  # the budget is spent: end here
        where = max(min(a.budget_used_s / self.clock.seconds, 1.0) * self.epoch_steps, step)
        return utils.learning_schedule(where, a.batch_size, a.base_lr, a.end_lr_ratio, self.epoch_steps,
                                       self.warmup_epoch_steps)
