"""``--tensorboard`` in the three training scripts, run end to end as subprocesses on tiny settings.

Each script runs twice into one folder (stopped early, then resumed). Between the two runs the test
appends a stale event past the resume point to the first run's event file, as a run killed after
logging would leave it. The event files must then hold every number of stats.txt at its global step
(the oracle parses stats.txt here), the learning rate and images/s, and each step once.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")  # requirements-dev.txt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto.event_pb2 import Event  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STALE = -12345.0  # the value of the planted stale event

PRETRAIN = ["main_vicregl.py", "--dataset", "builtin", "--builtin-images", "96", "--builtin-size", "32",
            "--arch", "resnet_test", "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2",
            "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2",
            "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size", "16", "--num-workers", "0",
            "--log-tensors-interval", "0", "--device", "cpu", "--warmup-epochs", "1", "--base-lr", "0.001",
            "--evaluate", "--eval-freq", "2", "--builtin-val-images", "64"]
EVALUATE = ["evaluate.py", "--dataset", "builtin", "--builtin-size", "32", "--builtin-images", "64",
            "--builtin-val-images", "24", "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test",
            "--batch-size", "16", "--workers", "0", "--device", "cpu", "--print-freq", "1", "--epochs", "2",
            "--knn", "--knn-k", "5"]
SEGMENT = ["segmentation/train.py", "--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu",
           "--workers", "0", "--builtin-size", "32", "--builtin-images", "64", "--builtin-val-images", "8",
           "--batch-size", "4", "--iters", "8", "--print-freq", "2", "--eval-interval", "4"]


def run(argv, exp_dir, *extra):
    proc = subprocess.run([sys.executable, *argv, "--exp-dir", str(exp_dir), "--tensorboard", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def plant_stale_event(exp_dir, tag, step):
    """Append to the run's only event file a ``tag`` value at ``step``, as a run that logged it and
    was killed before its next checkpoint would have left it."""
    files = sorted((exp_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    event = Event(wall_time=0.0, step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=STALE)]))
    with open(files[0], "ab") as f:
        RecordWriter(f).write(event.SerializeToString())


def read_board(exp_dir):
    """{tag: [(step, value), ...]} in the order TensorBoard shows them (stale events purged)."""
    acc = EventAccumulator(str(exp_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def stats_lines(exp_dir):
    """(prefix, dict) for every JSON line of stats.txt: prefix '' or 'Val: '."""
    out = []
    for line in (exp_dir / "stats.txt").read_text().splitlines():
        prefix = "Val: " if line.startswith("Val: ") else ""
        if line[len(prefix):].startswith("{"):
            out.append((prefix, json.loads(line[len(prefix):])))
    return out


def expected_points(lines, where):
    """{tag: [(step, value)]} for every number of every line; ``where(prefix, line)`` gives (group, step)
    or None for a line TensorBoard does not get."""
    points = {}
    for prefix, line in lines:
        place = where(prefix, line)
        if place is None:
            continue
        group, step = place
        for key, value in line.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(f"{group}/{key}", []).append((step, float(value)))
    return {tag: sorted(p) for tag, p in points.items()}


# ----------------------------------------------------------------------------- the three runs

@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    """One epoch, a stale event at step 8 (the checkpoint is at step 6), then the second epoch, which
    ends with the one validation (--eval-freq 2: the 64 built-in validation images once)."""
    exp = tmp_path_factory.mktemp("pretrain")
    run(PRETRAIN, exp, "--epochs", "1")
    plant_stale_event(exp, "train/l", 8)
    run(PRETRAIN, exp, "--epochs", "2")
    lines = stats_lines(exp)
    steps_per_epoch = sum(1 for p, l in lines if not p and l["ep"] == 0)
    # training lines at their `st`; validation after the epoch's last step
    return exp, lines, lambda p, l: ("val", (l["ep"] + 1) * steps_per_epoch - 1) if p else ("train", l["st"])


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One epoch (--stop-after-epochs), a stale event in the second epoch, then the second epoch."""
    exp = tmp_path_factory.mktemp("probe")
    run(EVALUATE, exp, "--stop-after-epochs", "1")
    steps = sum(1 for _, l in stats_lines(exp) if "step" in l)
    plant_stale_event(exp, "train/loss", steps + 1)
    run(EVALUATE, exp)
    lines = stats_lines(exp)

    def where(prefix, line):
        if "summary" in line:
            return None  # the final summary repeats the epoch lines' numbers
        if "knn_top1" in line:
            return "knn", 0
        if "step" in line:
            return "train", line["epoch"] * steps + line["step"]
        return "epoch", (line["epoch"] + 1) * steps - 1  # the epoch line at the epoch's last step
    return exp, lines, where


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """Three iterations (--stop-after-iters), a stale event at iteration 6, then up to iteration 8."""
    exp = tmp_path_factory.mktemp("segment")
    run(SEGMENT, exp, "--stop-after-iters", "3")
    plant_stale_event(exp, "train/loss", 6)
    run(SEGMENT, exp)
    return exp, stats_lines(exp), lambda p, l: ("val" if p else "train", l["it"])


SCRIPTS = ["pretrain", pytest.param("probe", marks=pytest.mark.slow), pytest.param("segment", marks=pytest.mark.slow)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scalars_equal_the_stats_lines_at_their_steps(script, request):
    exp, lines, where = request.getfixturevalue(script)
    expected = expected_points(lines, where)
    board = read_board(exp)
    board.pop("train/images_per_s")
    assert sorted(board) == sorted(expected)
    for tag, points in expected.items():
        got = sorted(board[tag])
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), tag
    if script != "probe":  # evaluate.py has no "Val: " lines; its epoch lines are checked above
        assert any(tag.startswith("val/") for tag in expected)


@pytest.mark.parametrize("script,lr_tag", [("pretrain", "train/lr"),
                                           pytest.param("probe", "train/lr_head", marks=pytest.mark.slow),
                                           pytest.param("segment", "train/lr", marks=pytest.mark.slow)])
def test_learning_rate_and_images_per_second_at_every_training_line(script, lr_tag, request):
    exp, lines, where = request.getfixturevalue(script)
    board = read_board(exp)
    train_steps = sorted(step for group, step in filter(None, (where(p, l) for p, l in lines)) if group == "train")
    assert len(train_steps) >= 4
    for tag in (lr_tag, "train/images_per_s"):
        assert sorted(s for s, _ in board[tag]) == train_steps, tag
        assert max(v for _, v in board[tag]) > 0, tag
    assert all(v > 0 for _, v in board["train/images_per_s"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_run_continues_the_curves_without_repeats(script, request):
    exp, lines, _ = request.getfixturevalue(script)
    assert len(list((exp / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per run
    for tag, points in read_board(exp).items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)  # increasing: no fold-back, no step twice
        assert all(v != STALE for _, v in points), tag  # the interrupted run's stale event is gone


# ----------------------------------------------------------------------------- without the package

@pytest.mark.parametrize("module,argv", [("main_vicregl", PRETRAIN + ["--epochs", "1"]), ("evaluate", EVALUATE),
                                         ("segmentation.train", SEGMENT)])
def test_missing_package_is_one_line_before_any_work(module, argv, tmp_path, monkeypatch, capsys):
    script = importlib.import_module(module)
    for name in ("tensorboard", "torch.utils.tensorboard"):  # None in sys.modules: importing it fails
        monkeypatch.setitem(sys.modules, name, None)
    exp = tmp_path / "exp"
    args = script.get_args_parser().parse_args([*argv[1:], "--exp-dir", str(exp), "--tensorboard"])
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install tensorboard"]
    assert not (exp / "stats.txt").exists()  # stopped before any work, not when the logger opened


# ----------------------------------------------------------------------------- under torchrun

@pytest.mark.slow
def test_under_torchrun_only_rank_0_writes_and_the_board_matches_its_log(tmp_path):
    """Two gloo processes, one step each per epoch: one event file (rank 0's), holding the numbers of
    the stats.txt lines that rank 0 alone writes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exp = tmp_path / "exp"
    argv = [a for a in PRETRAIN if a not in ("--evaluate",)]
    argv = argv[:argv.index("--eval-freq")] + argv[argv.index("--eval-freq") + 2:]  # no validation
    argv[argv.index("96")] = "32"  # 32 images, batch 16: two steps an epoch
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(port), *argv, "--epochs", "2", "--exp-dir", str(exp),
                           "--tensorboard"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(list((exp / "tensorboard").glob("events.out.tfevents.*"))) == 1
    lines = stats_lines(exp)
    assert [l["st"] for _, l in lines] == [0, 1, 2, 3]  # each step logged once, not once per rank
    expected = expected_points(lines, lambda p, l: ("train", l["st"]))
    board = read_board(exp)
    for tag, points in expected.items():
        got = sorted(board[tag])
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), tag
    assert sorted(s for s, _ in board["train/images_per_s"]) == [0, 1, 2, 3]
