"""Launch VICRegL pretraining on SLURM with submitit; the job requeues itself when preempted.

    python run_with_submitit.py --nodes 4 --ngpus 8 --fp16 --exp-dir /path/to/exp/ --arch resnet50 ...

Every flag of main_vicregl.py applies, plus the cluster flags below. No cluster path is hard-coded:
the rendezvous file and submitit's logs live in --shared-dir/<job id> (default --shared-dir:
<exp-dir>/submitit), which every node must see. ``%j`` in --exp-dir becomes the job id. When SLURM signals the end of the time
slot or a preemption (SIGUSR2, --signal-delay-s seconds ahead), every process checkpoints the
current step into <exp-dir>/model.pth, the job is requeued, and the new job resumes from there.

``--cluster local`` runs the same job on this machine through submitit's local executor (no SLURM),
which is how the tests exercise the requeue path.
"""
import argparse
import os
import shutil
import signal
import uuid
from pathlib import Path

import main_vicregl
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Submitit launcher for VICRegL pretraining",
                                     parents=[main_vicregl.get_args_parser(add_help=False)],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=4, help="number of nodes")
    g.add_argument("--ngpus", type=int, default=8,
                   help="GPUs per node (one process each); 0 runs CPU processes (--tasks-per-node)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: --ngpus, or 1 without GPUs)")
    g.add_argument("--timeout", type=int, default=4320, help="time limit of one job, in minutes")
    g.add_argument("--job_name", "--job-name", default="vicregl", help="SLURM job name")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--use_volta32", "--use-volta32", action="store_true",
                   help="request 32 GB V100s (adds the SLURM constraint volta32gb)")
    g.add_argument("--constraint", default=None, help="any other SLURM constraint")
    g.add_argument("--comment", default=None, help="SLURM comment")
    g.add_argument("--account", default=None, help="SLURM account, where the cluster needs one")
    g.add_argument("--qos", default=None, help="SLURM quality of service, where the cluster needs one")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: SLURM's)")
    g.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per process (data loading)")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="how many times the job may requeue itself after hitting the time limit")
    g.add_argument("--shared-dir", type=Path, default=None,
                   help="folder seen by every node for the rendezvous file and submitit's logs "
                        "(default: <exp-dir>/submitit)")
    g.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit executor (default: slurm when available, else local)")
    return parser


class Trainer:
    """The submitted callable: sets up one process of the job, trains, and on preemption hands
    over to submitit's requeue (``checkpoint`` returns the resubmission)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self):
        import submitit

        job = submitit.JobEnvironment()
        args = self.args
        main_vicregl.resolve_args(args, job_id=str(job.job_id))
        shared = Path(args.shared_dir) / str(job.job_id)
        shared.mkdir(parents=True, exist_ok=True)
        # One rendezvous file per (re)start: a file:// store must not be reused.
        args.dist_url = (shared / f"rendezvous_{args.rendezvous}").resolve().as_uri()
        os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks),
                          LOCAL_RANK=str(job.local_rank))
        usr_sig = job._usr_sig()  # the signal SLURM sends ahead of the limit (SIGUSR2 by default)
        requeue = signal.getsignal(usr_sig)  # submitit's handler: checkpoint() then requeue
        stopped_by = None
        try:
            stopped_by = main_vicregl.train(args, stop_signals=(signal.SIGTERM, signal.SIGUSR1, usr_sig))
        except utils.UserError as e:
            print(f"error: {e}", flush=True)
            raise
        finally:
            utils.cleanup_distributed()
        if stopped_by == usr_sig and callable(requeue):
            requeue(usr_sig, None)  # rank 0 resubmits and exits; the other ranks just return

    def checkpoint(self):
        """Called by submitit on rank 0 at preemption: the same job again, a fresh rendezvous."""
        import submitit

        args = argparse.Namespace(**vars(self.args))
        args.rendezvous = uuid.uuid4().hex
        return submitit.helpers.DelayedSubmission(Trainer(args))


def build_executor(args: argparse.Namespace):
    """SLURM (or submitit's debug executor) through AutoExecutor; ``--cluster local`` directly
    through LocalExecutor, whose time-limit signal is also what the tests use as a preemption."""
    import submitit

    folder = str(args.shared_dir / "%j")
    tasks = args.tasks_per_node or max(args.ngpus, 1)
    if args.cluster is None:
        args.cluster = "slurm" if shutil.which("srun") else "local"
    if args.cluster == "local":
        if args.nodes != 1:
            raise utils.UserError(f"--cluster local runs on this machine: --nodes must be 1, got {args.nodes}")
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=tasks, gpus_per_node=args.ngpus,
                                   signal_delay_s=args.signal_delay_s)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    params = dict(name=args.job_name, timeout_min=args.timeout, nodes=args.nodes, tasks_per_node=tasks,
                  gpus_per_node=args.ngpus, cpus_per_task=args.cpus_per_task)
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    if executor.cluster == "slurm":
        constraint = ",".join(c for c in ("volta32gb" if args.use_volta32 else None, args.constraint) if c)
        params["slurm_signal_delay_s"] = args.signal_delay_s
        for key, value in (("slurm_partition", args.partition), ("slurm_comment", args.comment),
                           ("slurm_account", args.account), ("slurm_qos", args.qos),
                           ("slurm_constraint", constraint or None)):
            if value is not None:
                params[key] = value
    executor.update_parameters(**params)
    return executor


def shared_dir(args: argparse.Namespace) -> Path:
    """--shared-dir, or <exp-dir>/submitit; when --exp-dir holds %j, the nearest folder above it
    without %j (submitit writes each job's logs to <shared-dir>/<job id>)."""
    if args.shared_dir is not None:
        if "%j" in str(args.shared_dir):
            raise utils.UserError("--shared-dir must not contain %j: each job's files already go to "
                                  "<shared-dir>/<job id>")
        return Path(args.shared_dir)
    exp = Path(args.exp_dir)
    while "%j" in str(exp):
        exp = exp.parent
    return exp / "submitit"


@utils.exit_on_user_error
def main():
    args = get_args_parser().parse_args()
    args.shared_dir = shared_dir(args)
    # Checks at submission, so that a typo does not wait in the queue; %j is expanded in the job.
    main_vicregl.check_args(main_vicregl.resolve_args(args), args.nodes * (args.tasks_per_node or max(args.ngpus, 1)))
    args.rendezvous = uuid.uuid4().hex
    executor = build_executor(args)
    job = executor.submit(Trainer(args))
    print(f"submitted job {job.job_id}; logs in {args.shared_dir}; stats in {args.exp_dir}/stats.txt")
    return job


if __name__ == "__main__":
    main()
