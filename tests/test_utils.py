"""Schedule, LARS, gather and file helpers against the reference vectors."""
import json
import os

import pytest
import torch

import utils


def test_learning_schedule_matches_reference(data_dir):
    settings = json.load(open(data_dir / "lr_schedule.json"))
    assert len(settings) == 3
    for s in settings:
        for step, expected in zip(s["steps"], s["lr"]):
            got = utils.learning_schedule(step, s["batch_size"], s["base_lr"], s["end_lr_ratio"],
                                          s["total_steps"], s["warmup_steps"])
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (s["warmup_steps"], step)


def test_learning_schedule_holds_end_value_past_total():
    end = utils.learning_schedule(100, 256, 1.0, 0.01, 100, 10)
    assert utils.learning_schedule(1000, 256, 1.0, 0.01, 100, 10) == pytest.approx(end) == pytest.approx(0.01)


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_matches_reference(data_dir, foreach):
    ref = torch.load(data_dir / "lars.pt", weights_only=True)
    params = [p.clone().requires_grad_() for p in ref["params0"]]
    assert float(params[2].detach().abs().sum()) == 0.0  # zero-norm parameter: adaptation factor 1
    opt = utils.LARS(params, lr=ref["lr"], weight_decay=ref["weight_decay"], momentum=ref["momentum"],
                     eta=ref["eta"], foreach=foreach)
    for grads, expected in zip(ref["grads"], ref["after_each_step"]):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_skips_decay_and_adaptation_for_vectors(foreach):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    utils.LARS([p], lr=0.5, weight_decay=10.0, foreach=foreach).step()
    assert torch.allclose(p.detach(), torch.zeros(4))  # 1 - 0.5 * 2, no decay, no eta scaling


def test_param_groups_weight_decay_excludes_vectors():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = utils.param_groups_weight_decay(m.named_parameters(), 0.05)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_single_process_helpers_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert utils.gather_batch(x) is x
    assert utils.get_world_size() == 1 and utils.get_rank() == 0 and utils.is_main_process()
    assert torch.equal(utils.all_reduce_mean(x.detach()), x.detach())


def test_init_distributed_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, None, "cpu")


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="--device cuda"):
        utils.resolve_device("cuda")


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pth"
    utils.save_atomic({"epoch": 1}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        utils.save_atomic({"epoch": 2, "bad": Unpicklable()}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["model.pth"]  # no temporary file left behind


def test_launchers_are_recognised_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
                 "MASTER_PORT"):  # monkeypatch restores them all afterwards
        monkeypatch.delenv(name, raising=False)
    # torch.distributed.launch without --use-env: RANK/WORLD_SIZE in the environment, --local-rank as a flag
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert utils.detect_launcher() == "torchrun"
    assert utils.init_distributed("cpu", local_rank=3).local_rank == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert utils.init_distributed("cpu", local_rank=3).local_rank == 1  # torchrun's variable wins
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[07-09,12]")
    assert utils.detect_launcher() == "slurm"
    info = utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert utils._slurm_master_addr() == "node07"


@pytest.mark.parametrize("workers, requested, cpus, local, expected", [
    (1, 0, 2, 1, 1),    # a 2-core laptop with one loading worker: one thread, not two fighting for a core
    (0, 0, 2, 1, 2),    # loading in the process itself: every core
    (2, 0, 16, 1, 14),
    (4, 0, 16, 2, 4),   # torchrun with two processes on 16 cores: 8 each, 4 left after the workers
    (8, 0, 4, 1, 1),    # more workers than cores: still one thread
    (1, 3, 2, 1, 3),    # --threads wins
])
def test_cpu_threads_leaves_the_workers_their_cores(workers, requested, cpus, local, expected):
    assert utils.cpu_threads(workers, requested, cpus=cpus, local_processes=local) == expected


def test_set_cpu_threads_respects_omp_num_threads_and_cuda(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        utils.set_cpu_threads(torch.device("cpu"), num_workers=50)  # more workers than cores: 1 thread
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        utils.set_cpu_threads(torch.device("cuda"), num_workers=50)  # the GPU does the work: untouched
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        utils.set_cpu_threads(torch.device("cpu"), num_workers=50)  # the user chose
        assert torch.get_num_threads() == 2
        utils.set_cpu_threads(torch.device("cpu"), num_workers=50, requested=1)  # --threads wins over the variable
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
