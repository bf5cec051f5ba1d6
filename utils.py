"""Ground floor of the project: process groups, the gather layer, the schedule, LARS, file helpers.

Everything here works in one plain process with no process group at all (rank 0, world size 1,
gather = identity), so the same code runs on a laptop CPU and under torchrun or SLURM.
This module imports no other project module.
"""
import errno
import json
import math
import os
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


# ----------------------------------------------------------------------------- process groups

def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        if os.environ.get(name) not in (None, ""):
            return int(os.environ[name])
    return None


def detect_launcher() -> str:
    """'torchrun' when RANK/WORLD_SIZE are set, 'slurm' inside an srun step, else 'none'."""
    if _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None:
        return "torchrun"
    if _env_int("SLURM_PROCID") is not None and _env_int("SLURM_NTASKS") is not None:
        return "slurm"
    return "none"


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    # "node[01-04,07]" -> "node01"; "a1,a2" -> "a1"
    head = nodes.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split("]")[0]
    return head


def init_distributed(device: str = "auto", dist_url: str = "env://", local_rank: int = -1) -> DistInfo:
    """Start the process group when a launcher asks for one, and pick this process's device.

    - torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set): env:// rendezvous;
    - SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID): rank and world size from SLURM, rendezvous
      at ``dist_url`` (env:// uses MASTER_ADDR/PORT, defaulting to the first node of the job);
    - no launcher: one plain process, no process group.
    Backend: nccl on CUDA, gloo on CPU. ``device`` is 'auto' (cuda when available), 'cpu' or 'cuda'.
    """
    launcher = detect_launcher()
    if launcher == "torchrun":
        # torch.distributed.launch without --use-env passes --local-rank instead of LOCAL_RANK
        local = _env_int("LOCAL_RANK")
        rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), local if local is not None else max(local_rank, 0)
    elif launcher == "slurm":
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID") or 0
        if dist_url == "env://":
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 10000))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ["LOCAL_RANK"] = str(local)
    else:
        rank, world, local = 0, 1, max(local_rank, 0)

    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if world > 1 and not is_dist():
        info.backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(info.backend, init_method=dist_url, world_size=world, rank=rank)
    elif is_dist():
        info.backend = dist.get_backend()
    return info


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; explicit 'cuda' needs CUDA."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if device == "cuda" \
            else torch.device(device)
    return torch.device(device)


def cpu_threads(num_workers: int, requested: int = 0, cpus: Optional[int] = None,
                local_processes: Optional[int] = None) -> int:
    """Intra-op threads for a process that trains on the CPU with ``num_workers`` data-loading
    processes: ``requested`` when > 0, else the cores left to it once its workers and the other
    processes on this machine (LOCAL_WORLD_SIZE under torchrun) have one each, at least 1.

    torch's default (one thread per core) oversubscribes a small machine as soon as workers load
    data: on 2 cores with one worker, a pretraining step of resnet_mini takes 0.85 s with 2 threads
    and 0.48 s with 1.
    """
    if requested > 0:
        return requested
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_processes is None:
        local_processes = _env_int("LOCAL_WORLD_SIZE") or 1
    return max(1, cpus // max(local_processes, 1) - num_workers)


def set_cpu_threads(device: torch.device, num_workers: int, requested: int = 0) -> None:
    """On the CPU, use ``cpu_threads`` intra-op threads: ``requested`` (--threads) when > 0; else the
    rule, unless OMP_NUM_THREADS chooses, and never more than torch's default. No effect on CUDA."""
    if device.type != "cpu":
        return
    if requested > 0:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), cpu_threads(num_workers)))


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU only: intra-op threads of this process (0: the cores left after the data-loading "
                             "workers, at least 1, unless OMP_NUM_THREADS is set)")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def free_port() -> int:
    """An unused TCP port on this host (for single-node rendezvous in tests and local jobs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- gather

class _GatherLayer(torch.autograd.Function):
    """all_gather along ``dim`` whose backward sums the gradients over processes (all-reduce) and
    returns this process's slice: every process then holds the gradient of the sum of all
    processes' losses with respect to its own inputs. Every process must send the same shape."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        ctx.rank, ctx.dim, ctx.size = dist.get_rank(), dim, x.shape[dim]
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat(pieces, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def gather_batch(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate ``x`` from every process along ``dim`` (the batch: B -> B·W), with a summed
    backward. The identity in one process."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherLayer.apply(x, dim)


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """all_gather along dim 0 without autograd (metrics)."""
    if not is_dist() or get_world_size() == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, 0)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (a collective: every process must call it). The
    identity in one process."""
    if not is_dist() or get_world_size() == 1:
        return flag
    return sum_over_processes(int(bool(flag))) > 0


def _reduce_ints(values: Sequence[int], op: str) -> List[int]:
    """``values`` reduced element-wise over processes with ``op`` ("SUM", "MAX": a ``dist.ReduceOp``
    name), a collective; as they are in one process."""
    if not is_dist() or get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return [int(v) for v in t.tolist()]


def sum_over_processes(n: int) -> int:
    """The sum of an integer over processes (a collective); ``n`` itself in one process."""
    return _reduce_ints([n], "SUM")[0]


def max_over_processes(values: Sequence[int]) -> List[int]:
    """The element-wise maximum of integers over processes (a collective); ``values`` in one process."""
    return _reduce_ints(values, "MAX")


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over processes (for logging); the identity in one process."""
    if not is_dist() or get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


# ----------------------------------------------------------------------------- optimisation

def learning_schedule(global_step: int, batch_size: int, base_lr: float, end_lr_ratio: float,
                      total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 to base_lr * batch_size / 256, then cosine decay to end_lr_ratio of it.

    ``batch_size`` is the global batch. Past ``total_steps`` the rate stays at its end value.
    """
    scaled_lr = base_lr * batch_size / 256
    if global_step < warmup_steps:
        return scaled_lr * global_step / warmup_steps
    end_lr = scaled_lr * end_lr_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return end_lr if global_step >= total_steps else scaled_lr
    progress = min(global_step - warmup_steps, decay_steps) / decay_steps
    q = 0.5 * (1 + math.cos(math.pi * progress))
    return scaled_lr * q + end_lr * (1 - q)


class LARS(torch.optim.Optimizer):
    """LARS with momentum (You et al. 2017) as VICReg(L) used it.

    For every parameter p that is not one-dimensional: g <- g + weight_decay * p, then
    g <- eta * |p| / |g| * g when both norms are positive. One-dimensional parameters (biases and
    norm weights) skip both. Then mu <- momentum * mu + g and p <- p - lr * mu.
    ``foreach`` (default) updates all parameters of a group in a few multi-tensor kernels instead
    of a Python loop of small ones; the arithmetic is the same.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, foreach: bool = True):
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta < 0:
            raise ValueError(f"LARS needs non-negative hyper-parameters, got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = (self._adapted_foreach(params, group) if group["foreach"]
                     else [self._adapted(p, group) for p in params])
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            if group["foreach"]:
                torch._foreach_mul_(mus, group["momentum"])
                torch._foreach_add_(mus, grads)
                torch._foreach_add_(params, mus, alpha=-group["lr"])
            else:
                for p, g, mu in zip(params, grads, mus):
                    mu.mul_(group["momentum"]).add_(g)
                    p.add_(mu, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapted(p: Tensor, group: dict) -> Tensor:
        g = p.grad
        if p.ndim <= 1:
            return g
        g = g.add(p, alpha=group["weight_decay"])
        p_norm, g_norm = torch.norm(p), torch.norm(g)
        q = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, torch.ones_like(p_norm))
        return g.mul(q)

    @staticmethod
    def _adapted_foreach(params: List[Tensor], group: dict) -> List[Tensor]:
        grads = [p.grad for p in params]
        big = [k for k, p in enumerate(params) if p.ndim > 1]
        if not big:
            return grads
        p_big = [params[k] for k in big]
        g_big = torch._foreach_add([grads[k] for k in big], p_big, alpha=group["weight_decay"])
        p_norm = torch.stack(torch._foreach_norm(p_big))
        g_norm = torch.stack(torch._foreach_norm(g_big))
        q = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, torch.ones_like(p_norm))
        torch._foreach_mul_(g_big, list(q.unbind()))
        for k, g in zip(big, g_big):
            grads[k] = g
        return grads


def param_groups_weight_decay(named_params: Iterable, weight_decay: float) -> List[dict]:
    """Two AdamW groups: one-dimensional parameters (biases, norm weights) without decay."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- logging

STATS_FILE = "stats.txt"
TENSORBOARD_DIR = "tensorboard"


def require_tensorboard():
    """torch's SummaryWriter class; a UserError saying what to install when the tensorboard package
    is missing (call it before any work starts, in every process)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class JsonLogger:
    """Rank 0's log: the command line, then one JSON object per line in ``exp_dir/stats.txt`` and on
    stdout; on a terminal also a progress line that each new line clears. Other ranks stay silent.

    With ``tensorboard``, rank 0 also writes the numbers of every line given a step to event files in
    ``exp_dir/tensorboard/``. ``purge_step`` is the first global step this run can log: events that
    an interrupted run wrote at or past it are discarded, so that a resumed curve does not fold back
    (None keeps every earlier event, for runs that only evaluate)."""

    def __init__(self, exp_dir, enabled: bool, tensorboard: bool = False, purge_step: Optional[int] = None):
        self.enabled, self.path = enabled, os.path.join(exp_dir, STATS_FILE)
        self.tty = enabled and sys.stdout.isatty()
        self.board = None
        if enabled:
            try:
                os.makedirs(exp_dir, exist_ok=True)
            except OSError as e:
                raise UserError(write_error_message(str(exp_dir), e)) from None
            self._append(" ".join(sys.argv))
            if tensorboard:
                folder = os.path.join(exp_dir, TENSORBOARD_DIR)
                try:
                    self.board = require_tensorboard()(folder, purge_step=purge_step)
                except OSError as e:
                    raise UserError(write_error_message(folder, e)) from None

    def log(self, stats: dict, prefix: str = "", step: Optional[int] = None, group: Optional[str] = None,
            extra: Optional[dict] = None) -> None:
        """Write ``prefix + json(stats)`` to stats.txt and stdout. With TensorBoard and a ``step``, also
        every number of ``stats`` and of ``extra`` (values for TensorBoard only, such as images/s) as
        ``<group>/<key>`` at ``step``; the group defaults to 'val' for prefixed (validation) lines and
        'train' for the others."""
        if not self.enabled:
            return
        line = prefix + json.dumps(stats)
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(line, flush=True)
        self._append(line)
        if self.board is not None and step is not None:
            self._board_scalars({**stats, **(extra or {})}, step, group or ("val" if prefix else "train"))

    def _board_scalars(self, values: dict, step: int, group: str) -> None:
        for key, value in values.items():
            # bools are flags, and strings (the zero-padded "t") are not measurements
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.board.add_scalar(f"{group}/{key}", value, step)
        self.board.flush()  # a killed or preempted run keeps every line it logged

    def _append(self, line: str) -> None:
        append_text(self.path, line + "\n")

    def progress(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(max(seconds, 0))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- files and errors

def save_atomic(obj, path: str, write: Optional[Callable] = None, resumable: bool = True) -> None:
    """``write(obj, file)`` (torch.save by default) to a new temporary file in the same folder, fsync,
    then rename it over ``path``: a crash while writing never leaves a truncated file in place of the
    last good one. A failed write (full disk, read-only or vanished folder) raises UserError naming the
    path and the cause (``resumable``: the message says that the same command continues from the last
    checkpoint); the previous file is left as it was and no temporary file remains. An error that is
    not a failed write (an object that cannot be saved) is raised as it is."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # a new file under a random name (O_EXCL): a link planted where the temporary file will be is
        # refused, never written through
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp.")
        with os.fdopen(fd, "wb") as f:
            _make_readable(fd)
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:  # torch.save's zip writer turns a failed write into a RuntimeError
        cause = write_failure_cause(e, folder)  # before the partial file goes: the disk is full now
        if cause is None and not isinstance(e, OSError):
            raise  # a RuntimeError with neither an errno nor a full disk behind it: no failed write
        cause = cause or e.strerror or str(e)
        raise UserError(write_error_message(path, cause, previous_kept=True, resumable=resumable)) from None
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:  # never created, or the folder went away
                pass


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path`` (created as a plain open would when missing), whole or not at all:
    a failed write (full disk, read-only folder) cuts the file back to where it was, so that the next run's lines do
    not continue a torn one, and raises UserError naming the path and the cause. A link planted at
    ``path`` is refused, never written through."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        raise UserError(write_error_message(path, e)) from None
    try:
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise
    except OSError as e:
        raise UserError(write_error_message(path, e)) from None
    finally:
        os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no symbolic links to refuse here
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less free space than this ran out of it


def write_failure_cause(error: BaseException, folder: str, path: Optional[str] = None) -> Optional[str]:
    """Why a write into ``folder`` failed, in a few words, or None when ``error`` is no failed write.

    The cause is the errno of the first OSError in the error's chain (itself, then what it was raised
    from or while handling: torch.save's zip writer raises a RuntimeError while handling the OSError),
    with the free space for a full disk ('No space left on device (0 bytes free in /x)'); without an
    errno, a (nearly) full filesystem under ``folder`` is the cause. A link refused at ``path`` is
    said so."""
    found = _errno_error(error)
    free = free_bytes(folder)
    if found is None and (free is None or free >= _NEARLY_FULL):
        return None
    code = found.errno if found is not None else errno.ENOSPC
    if code == errno.ELOOP and path is not None and os.path.islink(path):
        return "it is a symbolic link, which is not followed (remove it)"
    cause = os.strerror(code)
    if code == errno.ENOSPC and free is not None:
        cause += f" ({format_bytes(free)} free in {folder})"
    return cause


def _errno_error(error: BaseException) -> Optional[OSError]:
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        todo += [e.__cause__, e.__context__]
    return None


def free_bytes(folder: str) -> Optional[int]:
    """Bytes that an unprivileged write may still use in ``folder``'s filesystem; None when unknown."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # a vanished folder; no statvfs on Windows
        return None
    return stat.f_bavail * stat.f_frsize


def file_kind(mode: int) -> str:
    """What an ``st_mode`` that is not a regular file names, for messages: 'a FIFO', 'a folder', ..."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def format_bytes(n: int) -> str:
    """'0 bytes', '512 bytes', '1.5 MiB'."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _make_readable(fd: int) -> None:
    """mkstemp creates 0600; give the file the mode a plain open would (0666 less the umask), so that
    checkpoints stay as readable as before."""
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (OSError, AttributeError):  # a filesystem without modes (some network and FUSE mounts)
        pass


def _umask() -> int:
    try:  # read without setting it: os.umask would change it for a moment for every thread
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error_message(path: str, error, previous_kept: bool = False, resumable: bool = True) -> str:
    """One line: what could not be written, why (``error``: an exception, or the cause in words), and
    how to go on."""
    if isinstance(error, BaseException):
        error = (write_failure_cause(error, os.path.dirname(os.path.abspath(path)), path)
                 or getattr(error, "strerror", None) or str(error))
    kept = f"; the previous {os.path.basename(path)} (if any) is intact" if previous_kept else ""
    then = " to continue from the last checkpoint" if resumable else ""
    return f"cannot write {path}: {error}{kept}. Make room or fix the folder, then run the same command again{then}"


# The opt-in for checkpoints that hold Python objects (pickles that can run code), the same in every script.
TRUST_FLAG = "--trust-checkpoint"


def add_trust_argument(parser) -> None:
    """Add ``--trust-checkpoint`` to an argparse parser or group (``args.trust_checkpoint``)."""
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="load checkpoints that hold Python objects besides tensors and plain data. Such "
                             "a file can run code when loaded: use this only for files you trust")


class UserError(Exception):
    """A mistake in the command line or the input files: printed without a traceback, exit code 2."""


def exit_on_user_error(fn):
    """Decorator for entry points: print UserError messages plainly and exit with status 2."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
