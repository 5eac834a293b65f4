"""Many machines and Slurm for main.py: the cluster environment, the run folder of a (requeued) Slurm job, and
preemption by signal -> ``last.ckpt`` -> ``scontrol requeue`` -> exact resume.

Under Slurm (Lightning's :class:`SLURMEnvironment` detects it: ``SLURM_NTASKS`` set and the job not an interactive
shell) ranks, world size and the master address come from Slurm's variables; one task per GPU
(``srun python main.py ...``). Lightning's own auto-requeue is off: its SIGUSR1 handler saves the checkpoint inside
the signal handler, in the middle of a training step. :class:`RequeueOnSignal` instead saves ``last.ckpt`` between
batches, on every rank at the same batch (the checkpoint of :class:`~ldm.training.callbacks.StopOnSignal`), then
rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and the job stops. The requeued job keeps its id, so the same command
line finds its run folder (``<logdir>/slurm-<job id>[_<name>]``) and continues from its ``last.ckpt``.

Without Slurm, several machines are started by hand, one ``main.py`` per node with the same command line and
``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` (and the same ``LDM_RUN_TIMESTAMP``, so that all name one run
folder) in the environment: Lightning's default environment reads them. :func:`check_distributed_environment`
checks them before anything is built (a missing ``MASTER_ADDR`` would otherwise wait 30 minutes at "Initializing
distributed", a rank outside the world would never be refused), and the process group gets a bounded timeout
(:data:`DIST_TIMEOUT_ENV`, default :data:`DEFAULT_DIST_TIMEOUT` seconds) for nodes that never arrive.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, List, Mapping, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

from ..training.callbacks import StopOnSignal, TrainingStopped

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1  # sbatch --signal=USR1@<seconds before the time limit>


def slurm_job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for an array task); None outside a Slurm batch
    job (Lightning's detection: ``SLURM_NTASKS`` set, the job not an interactive shell)."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive") or "SLURM_JOB_ID" not in env:
        return None
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env \
        else env["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"SLURM_JOB_ID: unexpected job id {job!r}")
    return job


def run_timestamp(default: str) -> str:
    """The ``now`` part of the run folder: ``slurm-<job id>`` in a Slurm job (the same in every task, and again in
    the requeued job), else ``default`` (a timestamp)."""
    job = slurm_job_id()
    return f"slurm-{job}" if job is not None else default


# seconds a node waits for the others at the start (and torch.distributed's collective timeout); torch's default
# is 30 minutes, spent with no word when a node was started wrong
DIST_TIMEOUT_ENV = "LDM_DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT = 600


def dist_timeout(env: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if env is None else env
    text = env.get(DIST_TIMEOUT_ENV, "") or str(DEFAULT_DIST_TIMEOUT)
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return seconds


# Lightning's names of plain DDP -> find_unused_parameters
_DDP_STRATEGIES = {"ddp": False, "ddp_find_unused_parameters_false": False, "ddp_find_unused_parameters_true": True}


def with_timeout(strategy: Any) -> Any:
    """A DDP strategy named by Lightning's string as the strategy object with :func:`dist_timeout`: nodes that
    never arrive end the start after a bounded wait, not torch's 30 minutes. Any other strategy is returned as it
    is (a config that names its own strategy object sets its own timeout)."""
    if not isinstance(strategy, str) or strategy not in _DDP_STRATEGIES:
        return strategy
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=_DDP_STRATEGIES[strategy],
                       timeout=datetime.timedelta(seconds=dist_timeout()))


def check_distributed_environment(num_nodes: int, env: Optional[Mapping[str, str]] = None) -> None:
    """The variables a run across processes needs, checked before anything is built: a ``ValueError`` naming
    what is missing or wrong. Slurm gives them itself; torchrun gives ``RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR``; nodes started by hand need ``MASTER_ADDR``, ``MASTER_PORT`` and a ``NODE_RANK`` in
    ``0 .. num_nodes - 1``."""
    env = os.environ if env is None else env
    if slurm_job_id(env) is not None:
        return
    if env.get("RANK") and env.get("WORLD_SIZE"):  # torchrun / torch.distributed.launch
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside the world of WORLD_SIZE={world} processes (0 .. {world - 1})")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing and world > 1:
            raise ValueError(f"RANK={rank} of WORLD_SIZE={world}: {' and '.join(missing)} not set; every process "
                             "needs the address and port of rank 0")
        return
    node_rank = _int_var(env, "NODE_RANK") if env.get("NODE_RANK") else 0
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"NODE_RANK={node_rank} is outside the world of --num_nodes {num_nodes} (node ranks 0 .. "
                         f"{num_nodes - 1})")
    if num_nodes > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ValueError(f"--num_nodes {num_nodes} (NODE_RANK={node_rank}): {' and '.join(missing)} not set; "
                             "every node needs the address and a free port of node 0 in MASTER_ADDR and MASTER_PORT")


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r}: expected an integer") from None


def plugins() -> List[Any]:
    """Trainer plugins: Slurm's environment with Lightning's mid-step auto-requeue off (see the module docstring)."""
    if slurm_job_id() is not None:
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def stop_callback(ckpt_path: Path) -> StopOnSignal:
    """:class:`RequeueOnSignal` in a Slurm job, else :class:`StopOnSignal` (SIGTERM / Ctrl-C)."""
    return RequeueOnSignal(ckpt_path) if slurm_job_id() is not None else StopOnSignal(ckpt_path)


def requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; False (logged) when it fails: the checkpoint is saved either way."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("scontrol requeue %s failed (%s); resume by hand with --resume", job_id, err)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (exit %d: %s); resume by hand with --resume", job_id,
                    result.returncode, result.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job_id)
    return True


class RequeueOnSignal(StopOnSignal):
    """:class:`StopOnSignal` that also answers Slurm's warning signal (SIGUSR1): after the current batch every rank
    saves ``last.ckpt``, rank 0 requeues the job, and the run stops (exit status 128 + 10)."""

    signals = (signal.SIGINT, signal.SIGTERM, REQUEUE_SIGNAL)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        wants_requeue = self.received == REQUEUE_SIGNAL
        if trainer.world_size > 1:
            wants_requeue = trainer.strategy.reduce_boolean_decision(wants_requeue, all=False)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        except TrainingStopped:
            job = slurm_job_id()
            if wants_requeue and trainer.is_global_zero and job is not None:
                requeue(job)
            raise
