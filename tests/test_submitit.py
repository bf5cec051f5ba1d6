"""run_with_submitit.py without a cluster: submitit's local executor runs the job, a SIGUSR2 (what
SLURM sends ahead of a time limit or a preemption) makes it checkpoint and requeue, and the
requeued job resumes where it stopped."""
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

import run_with_submitit  # noqa: E402

from test_main import TINY  # noqa: E402


def _task_pids(job_id):
    """PIDs of the job's task processes (their environment names the local job id)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in env and b"SUBMITIT_LOCAL_GLOBALID=0" in env:
            pids.append(int(entry.name))
    return pids


def _steps(stats):
    if not stats.exists():
        return []
    return [json.loads(l)["st"] for l in stats.read_text().splitlines() if l.startswith("{")]


@pytest.mark.slow
def test_local_job_checkpoints_requeues_and_resumes(tmp_path, monkeypatch):
    # 8 epochs x 6 steps: the signal, sent once step 3 is logged, lands well before the end even on a slow
    # machine; wherever it lands, the checks below hold.
    args = ["run_with_submitit.py", "--cluster", "local", "--nodes", "1", "--ngpus", "0", "--timeout", "15",
            *TINY, "--epochs", "8", "--exp-dir", str(tmp_path / "exp_%j")]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = run_with_submitit.main()
    exp = tmp_path / f"exp_{job.job_id}"  # %j became the job id
    deadline = time.time() + 600  # generous: only a job that never starts fails here
    while max(_steps(exp / "stats.txt"), default=-1) < 3:  # wait until the job is training
        assert time.time() < deadline and job.state != "FINISHED", "the job did not start training"
        time.sleep(0.2)
    pids = _task_pids(job.job_id)
    assert pids, "task process not found"
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)  # preemption / time limit
    job.result()  # raises if the job failed
    log = Path(job.paths.stdout).read_text()
    saved = re.search(r"checkpoint saved at epoch (\d+), step (\d+)", log)
    assert "Requeued job" in log and saved, log[-3000:]
    assert f"resuming from {exp / 'model.pth'}: epoch {saved.group(1)}, step {saved.group(2)} of that epoch" in log
    steps = _steps(exp / "stats.txt")
    assert steps[-1] == 47 and set(steps) == set(range(48))  # 8 epochs x 6 steps, none lost
    assert (exp / "backbone.pth").exists()
    assert (tmp_path / "submitit" / str(job.job_id)).is_dir()  # logs beside, not inside, exp_%j


def test_cluster_flags_reach_slurm_parameters(tmp_path, monkeypatch):
    import submitit.slurm.slurm as slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists
    monkeypatch.setattr(sys, "argv", ["run_with_submitit.py", "--cluster", "slurm", "--nodes", "2", "--ngpus", "8",
                                      "--partition", "p", "--use_volta32", "--account", "acc", "--qos", "high",
                                      "--mem-gb", "400", "--comment", "deadline", "--exp-dir", str(tmp_path / "e")])
    args = run_with_submitit.get_args_parser().parse_args()
    args.shared_dir = run_with_submitit.shared_dir(args)
    assert args.shared_dir == tmp_path / "e" / "submitit"
    params = run_with_submitit.build_executor(args)._executor.parameters
    assert (params["partition"], params["account"], params["qos"], params["comment"]) == ("p", "acc", "high", "deadline")
    assert params["constraint"] == "volta32gb" and params["nodes"] == 2 and params["gpus_per_node"] == 8
    assert params["ntasks_per_node"] == 8 and params["mem"] == "400GB" and params["signal_delay_s"] == 120
    assert params["cpus_per_task"] == 10 and params["time"] == 4320 and params["job_name"] == "vicregl"


def test_shared_dir_with_job_id_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_with_submitit.py", "--cluster", "local", "--nodes", "1",
                                      "--shared-dir", str(tmp_path / "x_%j"), *TINY])
    with pytest.raises(SystemExit) as e:
        run_with_submitit.main()
    assert e.value.code == 2 and "--shared-dir must not contain %j" in capsys.readouterr().err
