"""Checkpoint bookkeeping: a completeness marker per step folder and an atomic resume tracker.

verl 0.9.1 (``verl/trainer/ppo/ray_trainer.py``, ``RayPPOTrainer._save_checkpoint``) saves a step
as ``<trainer.default_local_dir>/global_step_<N>/actor/`` (the actor workers' shards), then
``global_step_<N>/data.pt`` (the dataloader state), then writes ``<N>`` into
``<trainer.default_local_dir>/latest_checkpointed_iteration.txt`` (the tracker) with a plain
``open(..., "w")``: a crash while writing it leaves an empty or partial tracker. On resume,
``RayPPOTrainer._load_checkpoint`` reads the tracker through
``verl/utils/checkpoint/checkpoint_manager.py::find_latest_ckpt_path``, which returns None when
the folder it names is missing, and the run silently restarts from step 0.

Here, instead:

* :func:`save_with_atomic_tracker` runs verl's save with its tracker write captured, writes
  ``global_step_<N>/vitos_complete.json`` (:data:`MARKER`) once ``actor/`` and ``data.pt`` are
  there, and only then the tracker, atomically (:func:`vitos_verl.atomic.atomic_write_text`:
  temporary file, ``fsync``, ``os.replace``).
  A save interrupted at any point leaves the tracker at the previous complete step.
* :func:`check_resume` runs before verl's load: a tracker that is not a step number, or names a
  folder that is missing or incomplete (no marker, no ``actor/`` shards, no ``data.pt``), raises
  :class:`CheckpointError` naming the path and the ways out; so does an incomplete
  ``trainer.resume_from_path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vitos_verl.atomic import atomic_write_text
from vitos_verl.compat import verl_0_9

TRACKER = "latest_checkpointed_iteration.txt"  # verl 0.9.1 checkpoint_manager.get_checkpoint_tracker_filename
MARKER = "vitos_complete.json"
STEP_PREFIX = "global_step_"


class CheckpointError(RuntimeError):
    """A resume tracker or step folder that cannot be resumed from; the message says how to fix it."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """``<root>/global_step_<step>``, verl's step folder."""
    return Path(root) / f"{STEP_PREFIX}{int(step)}"


def missing_parts(folder: str | os.PathLike, step: int | None = None) -> list[str]:
    """What a step folder lacks to be resumed from; ``[]`` when it is complete.

    Complete: the folder exists, ``actor/`` holds files, ``data.pt`` exists, and :data:`MARKER`
    is valid JSON whose ``global_step`` equals ``step`` (when given).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder itself"]
    out = []
    actor = folder / "actor"
    if not actor.is_dir() or not any(actor.iterdir()):
        out.append("actor/ (the actor's shards)")
    if not (folder / "data.pt").is_file():
        out.append("data.pt (the dataloader state)")
    try:
        marker = json.loads((folder / MARKER).read_text())
        if step is not None and int(marker.get("global_step", -1)) != int(step):
            out.append(f"{MARKER} for step {step} (it names step {marker.get('global_step')})")
    except (OSError, ValueError, TypeError, AttributeError):
        out.append(f"{MARKER} (written when a save finished)")
    return out


def complete_steps(root: str | os.PathLike) -> list[int]:
    """The steps under ``root`` whose folders are complete (:func:`missing_parts`), ascending."""
    root = Path(root)
    steps = []
    for p in root.glob(f"{STEP_PREFIX}*") if root.is_dir() else []:
        suffix = p.name[len(STEP_PREFIX):]
        if suffix.isdigit() and not missing_parts(p, int(suffix)):
            steps.append(int(suffix))
    return sorted(steps)


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Write :data:`MARKER` into a step folder whose ``actor/`` and ``data.pt`` are saved.

    Raises:
        CheckpointError: ``actor/`` or ``data.pt`` is missing (the save did not finish).
    """
    folder = Path(folder)
    lacking = [m for m in missing_parts(folder) if not m.startswith(MARKER)]
    if lacking:
        raise CheckpointError(f"{folder}: save did not finish, missing {', '.join(lacking)}")
    atomic_write_text(folder / MARKER, json.dumps({"global_step": int(step)}) + "\n")


def read_tracker(root: str | os.PathLike) -> int | None:
    """The step ``<root>/latest_checkpointed_iteration.txt`` names; None when there is no tracker.

    Raises:
        CheckpointError: the tracker's content is not a non-negative integer.
    """
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(
            f"resume tracker {tracker} holds {text[:40]!r}, not a step number (a save interrupted while writing it?). "
            f"{_ways_out(root)}"
        )
    return int(text)


def _ways_out(root: str | os.PathLike) -> str:
    tracker = Path(root) / TRACKER
    return (
        f"Complete checkpoints under {root}: {complete_steps(root) or 'none'}. To go on, write the number of a complete "
        f"step into {tracker}, or set trainer.resume_mode=resume_path trainer.resume_from_path=<a complete "
        f"{STEP_PREFIX}N folder>, or delete {tracker} (or set trainer.resume_mode=disable) to start from step 0."
    )


def _incomplete(folder: Path, step: int | None, missing: list[str], root: str | os.PathLike, source: str) -> CheckpointError:
    legacy = ""
    if missing == [f"{MARKER} (written when a save finished)"]:
        legacy = (
            f" A folder saved before ViToS wrote {MARKER} lacks only that: if you know it is complete, "
            f"write {{\"global_step\": {step}}} into {folder / MARKER}."
        )
    return CheckpointError(f"{source} names {folder}, which is missing {', '.join(missing)}.{legacy} {_ways_out(root)}")


def resolve_resume(root: str | os.PathLike) -> Path | None:
    """The complete step folder the tracker under ``root`` names, or None when there is no tracker.

    Raises:
        CheckpointError: a tracker that is not a number, or that names a missing or incomplete
            folder (the message names the tracker, the folder, what it lacks and the ways out).
    """
    step = read_tracker(root)
    if step is None:
        return None
    folder = step_dir(root, step)
    missing = missing_parts(folder, step)
    if missing:
        raise _incomplete(folder, step, missing, root, f"resume tracker {Path(root) / TRACKER}")
    return folder


def check_resume(trainer: Mapping[str, Any]) -> Path | None:
    """Check what verl 0.9.1's ``RayPPOTrainer._load_checkpoint`` is about to resume from.

    Args:
        trainer: the ``trainer`` config block (``resume_mode``, ``default_local_dir``,
            ``resume_from_path``); relative paths are taken from the working directory, as verl does.

    Returns:
        The step folder to resume from, or None (``resume_mode=disable``, or ``auto`` without a
        tracker: a fresh start).

    Raises:
        CheckpointError: see :func:`resolve_resume`; for ``resume_mode=resume_path``, an
            incomplete ``resume_from_path``.
    """
    mode = trainer.get("resume_mode", "auto")
    root = os.path.abspath(str(trainer.get("default_local_dir")))
    if mode == "disable":
        return None
    if mode == "resume_path":
        folder = Path(os.path.abspath(str(trainer.get("resume_from_path"))))
        suffix = folder.name[len(STEP_PREFIX):] if folder.name.startswith(STEP_PREFIX) else ""
        missing = missing_parts(folder, int(suffix) if suffix.isdigit() else None)
        if missing:
            raise _incomplete(folder, int(suffix) if suffix.isdigit() else None, missing, folder.parent, "trainer.resume_from_path")
        return folder
    return resolve_resume(root)


def save_with_atomic_tracker(save: Callable[[], Any], root: str | os.PathLike, step: int) -> bool:
    """Run verl's ``_save_checkpoint`` (``save``) with a marker and an atomic tracker.

    Args:
        save: the bound ``RayPPOTrainer._save_checkpoint`` (verl 0.9.1), which writes
            ``<root>/global_step_<step>/{actor/, data.pt}`` and then the tracker.
        root: ``trainer.default_local_dir``.
        step: the step being saved (``global_steps``).

    Returns:
        True when the tracker now names ``step``; False when verl wrote no tracker
        (``actor.checkpoint.async_save``: the shards are still being written, so no marker either).

    Raises:
        CheckpointError: verl returned but the folder lacks ``actor/`` or ``data.pt``.
        Exception: whatever verl's save raised; the tracker still names the previous step.
    """
    with verl_0_9.capture_tracker_write(Path(root) / TRACKER) as captured:
        save()
    if not captured:
        return False
    mark_complete(step_dir(root, step), step)
    atomic_write_text(Path(root) / TRACKER, str(int(step)))
    return True
