"""Run folders: which folder a run writes to or continues (new, resumed, requeued, a DDP rank of a run started
elsewhere), claiming a new one atomically, and finding the newest complete checkpoint inside one."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checkpoints.files import CheckpointError, verify_zip_checksums
from .cluster import slurm_job_id

log = logging.getLogger("main")


# Read, never set: a parent that starts main.py may choose the run's timestamp (the folder is still claimed, so a
# taken name gets a suffix).
RUN_TIMESTAMP_ENV = "LDM_RUN_TIMESTAMP"


# A run folder is claimed by the process that starts the run; the DDP processes Lightning starts during fit
# (they run this script again) find it here. Set only while main() runs, so it never leaks into a later run.
RUN_FOLDER_ENV = "LDM_RUN_FOLDER"


@dataclasses.dataclass
class RunFolder:
    """Where a run writes and what it continues: ``path`` (``<logdir>/<now>_<name>``), ``now`` (the timestamp in
    its config file names), ``resume`` (checkpoint to continue, or None), ``configs`` (YAML files to merge), and
    ``new`` (the folder is to be claimed, :func:`claim_run_folder`)."""
    path: Path
    now: str
    resume: Optional[Path]
    configs: List[str]
    new: bool
    lock: Optional["RunLock"] = None  # held by the process that trains here (rank 0), from take_run_folder on
    claimed: bool = False  # this process made the folder (take_run_folder): removed again if the run never starts


def resolve_run(opt: argparse.Namespace, now: str) -> RunFolder:
    """What the flags ask for. ``--resume`` of a run folder (or a checkpoint in its ``checkpoints/``) continues in
    that folder with its saved configs (plus ``--base`` files, merged after them), from its newest checkpoint
    (:func:`resume_run`); a checkpoint elsewhere continues in a new run folder with the ``--base`` configs."""
    base = list(opt.base)

    def new_run(ckpt: Optional[Path]) -> RunFolder:
        name = opt.name or (Path(base[0]).stem if base else "")
        return RunFolder(Path(opt.logdir) / (now + (f"_{name}" if name else "") + opt.postfix), now, ckpt, base,
                         new=True)

    if not opt.resume:
        return new_run(None)
    resume = Path(opt.resume)
    if not resume.exists():
        raise FileNotFoundError(f"--resume {resume}: no such log folder or checkpoint")
    if resume.is_file():
        logdir = resume.parent.parent  # <run>/checkpoints/<file>.ckpt
        saved = sorted(glob.glob(str(logdir / "configs" / "*.yaml"))) if resume.parent.name == "checkpoints" else []
        if not saved:
            if not base:
                raise FileNotFoundError(
                    f"--resume {resume}: not inside a run folder (<run>/checkpoints/{resume.name} next to "
                    "<run>/configs/*.yaml); give the run's configs with --base to continue it in a new run folder")
            return new_run(resume)
        _check_no_name(opt)
        refuse_going_back(resume)
        return RunFolder(logdir, now, resume, saved + base, new=False)
    _check_no_name(opt)
    ckpt, saved = resume_run(resume)
    return RunFolder(resume, now, ckpt, saved + base, new=False)


def resume_run(run: Path) -> Tuple[Path, List[str]]:
    """An existing run folder -> (its newest complete checkpoint, its saved config files): what continues it (a
    ``--resume`` of the folder; a requeued job finds its run the same way)."""
    saved = sorted(glob.glob(str(run / "configs" / "*.yaml")))
    ckptdir = run / "checkpoints"
    found = run_checkpoints(ckptdir)
    if not found:
        raise FileNotFoundError(f"--resume {run}: no complete checkpoint in {ckptdir} (expected last.ckpt or "
                                "periodic-*.ckpt)")
    if not saved:
        raise FileNotFoundError(f"--resume {run}: no configs in {run / 'configs'}; resume its checkpoint "
                                f"instead: --resume {found[0][1]} --base <the run's configs>")
    for step, ckpt in found:  # newest first; a damaged one (its zip checksums) is passed over, with a line
        try:
            verify_zip_checksums(ckpt)
        except CheckpointError as e:
            log.warning("passing over %s", e)
            continue
        others = ", ".join(f"{p.name} (step {s})" for s, p in found if p != ckpt)
        log.info("--resume %s: continuing from %s, global step %d, the newest complete checkpoint%s", run,
                 ckpt.name, step, f" (also there: {others})" if others else "")
        return ckpt, saved
    raise CheckpointError(f"--resume {run}: every checkpoint in {ckptdir} is damaged")


def checkpoint_step(path: Path) -> Optional[int]:
    """The global step stored inside a training checkpoint; None when it cannot be read (a torn write)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception:  # noqa: BLE001  (anything unreadable is not a checkpoint to continue from)
        return None


def run_checkpoints(ckptdir: Path) -> List[Tuple[int, Path]]:
    """The readable training checkpoints of a run as (global step, path), newest first by the step stored inside
    (``last.ckpt`` first among equals: it also holds the state at an epoch's end)."""
    found = [(step, p) for p in ckptdir.glob("*.ckpt") if (step := checkpoint_step(p)) is not None]
    return sorted(found, key=lambda sp: (-sp[0], sp[1].name != "last.ckpt", sp[1].name))


def refuse_going_back(ckpt: Path) -> None:
    """A checkpoint of a run folder resumed while the run holds newer ones would redo those steps and let the
    checkpoint rotation replace the newer files: refused, naming the newest."""
    step = resume_step(ckpt)
    newer = [(s, p) for s, p in run_checkpoints(ckpt.parent) if s > step]
    if newer:
        raise ValueError(f"--resume {ckpt}: the run has newer checkpoints ({newer[0][1].name} at global step "
                         f"{newer[0][0]}, this one is at {step}); resume the run folder {ckpt.parent.parent} to "
                         "continue from the newest, or move the newer ones out of checkpoints/ first")


def claim_run_folder(path: Path, now: str) -> Tuple[Path, str]:
    """Create the new run folder ``path`` (``<logdir>/<now>_<name>``) atomically; if it exists (another run of
    the same name started in the same second), ``<now>-1_<name>``, ``<now>-2_<name>`` ... -> (folder, its
    timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rest = path.name[len(now):]
    for n in itertools.count():
        stamp = now if n == 0 else f"{now}-{n}"
        try:
            os.mkdir(path.parent / (stamp + rest))
        except FileExistsError:
            continue
        return path.parent / (stamp + rest), stamp
    raise AssertionError("unreachable")


def _check_no_name(opt: argparse.Namespace) -> None:
    if opt.name:
        raise ValueError("-n/--name and -r/--resume of a run folder cannot be given together: a resumed run keeps "
                         "its folder")


def resume_step(ckpt: Path) -> int:
    """The global step of a checkpoint ``--resume`` can continue; anything else (e.g. the paper's released
    weights, a state dict) is a ``ValueError`` saying how to start from its weights instead; a damaged file is a
    ``CheckpointError`` naming it."""
    verify_zip_checksums(ckpt)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file gets the same advice)
        state = e
    if not isinstance(state, dict) or not {"state_dict", "optimizer_states", "loops", "global_step"} <= set(state):
        why = (f"cannot be read weights-only ({type(state).__name__}: {state})" if isinstance(state, Exception)
               else "holds weights without this project's training state (optimizers, loops)")
        raise ValueError(f"--resume {ckpt}: {why}, so training cannot continue from it. To start a new run from its "
                         f"weights: python main.py --base <config.yaml> -t model.params.ckpt_path={ckpt}")
    return int(state["global_step"])


def launched_run() -> Optional[Tuple[Path, str]]:
    """(folder, timestamp) of the run whose rank-0 process started this one (DDP), else None."""
    shared = os.environ.get(RUN_FOLDER_ENV)
    if not shared:
        return None
    info = json.loads(shared)
    return Path(info["path"]), info["now"]


def _external_rank() -> int:
    """This process's global rank when a launcher outside Lightning started it (torchrun, srun), or > 0 on every
    machine but the first of a multi-node run started by hand (``NODE_RANK``, Lightning's variable), else 0."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return int(os.environ.get("NODE_RANK", "0") or 0)


def take_run_folder(folder: RunFolder) -> RunFolder:
    """Step 4: a new run claims its folder (:func:`claim_run_folder`), unless this process was started by the
    run's rank-0 process, which claimed it; a resumed run keeps its folder."""
    launched = launched_run()
    if launched is not None:
        return dataclasses.replace(folder, path=launched[0], now=launched[1], new=False)
    if folder.new and _external_rank() > 0:
        # started by srun / torchrun beside rank 0, which claims the folder; Lightning gives every rank rank 0's
        # checkpoint folder, and only rank 0 writes configs, logs and images
        return dataclasses.replace(folder, new=False)
    if folder.new:
        path, now = claim_run_folder(folder.path, folder.now)
        log.info("run folder %s", path)
        folder = dataclasses.replace(folder, path=path, now=now, new=False, claimed=True)
    elif _external_rank() > 0:
        return folder  # rank 0 of this run holds the lock
    return dataclasses.replace(folder, lock=RunLock.acquire(folder.path))


def requeued_run(logdir: Path) -> bool:
    """Whether a new Slurm run's folder already holds a complete checkpoint of any kind (``last.ckpt``,
    ``periodic-*.ckpt``, a best one: a hard kill may have left only a periodic one): the job was requeued and
    continues there, main.py then resumes that folder from its newest checkpoint by the step stored inside."""
    return slurm_job_id() is not None and bool(run_checkpoints(Path(logdir) / "checkpoints"))


LOCK_NAME = "training.lock"


class RunLock:
    """One process at a time trains in a run folder: ``<run>/training.lock`` names its holder (pid, host and
    Slurm job). A lock whose holder is gone (its pid no longer runs on this host, or an earlier run of the same
    Slurm job, which Slurm never runs twice at once) is taken over, with a line saying so; a live holder, or one
    on another host that cannot be checked, is a ``ValueError`` naming it."""

    def __init__(self, path: Path, holder: Dict[str, Any]):
        self.path, self.holder = path, holder

    @staticmethod
    def me() -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_id()}

    @classmethod
    def acquire(cls, run: Path) -> "RunLock":
        path = Path(run) / LOCK_NAME
        me = cls.me()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                why = _gone(holder, me)
                if why is None:
                    raise ValueError(f"{run} is in use: another training holds {path} (pid {holder.get('pid')} on "
                                     f"host {holder.get('host')}{_job(holder)}); wait for it to finish, or delete "
                                     f"{path} if that process is gone") from None
                log.warning("taking over %s: its holder (pid %s on host %s%s) %s", path, holder.get("pid"),
                            holder.get("host"), _job(holder), why)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path, me)
        raise ValueError(f"{run}: could not take {path} (other processes keep taking it)")

    def release(self) -> None:
        """Remove the lock, if it is still this process's."""
        if _read_lock(self.path).get("pid") == self.holder["pid"] and \
                _read_lock(self.path).get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> Dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # vanished, or a torn write of a killed process


def _job(holder: Dict[str, Any]) -> str:
    return f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""


def _gone(holder: Dict[str, Any], me: Dict[str, Any]) -> Optional[str]:
    """Why the lock's holder is known to be gone, or None when it may still run."""
    if not holder:
        return "left an unreadable lock file"
    if me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]:
        return "was an earlier run of this Slurm job (requeued)"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if pid == me["pid"]:
        return "was this process (an earlier run that ended without releasing it)"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "is no longer running"
    except (OSError, TypeError, ValueError):
        return None
    return None
