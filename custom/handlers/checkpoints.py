"""Checkpoints that survive a kill: atomic writes, the last K training states and the best model, and
the newest complete state found again on resume."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def save_atomically(obj: object, path: str | Path) -> None:
    """``torch.save`` to ``.<name>.partial`` beside ``path``, flush it to disk, then rename it over
    ``path``: a kill at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler writing each checkpoint with :func:`save_atomically`; with ``filename``
    every save goes to that one fixed name (as MONAI does for ``model.pt`` and the final state)."""

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.dirname.mkdir(parents=True, exist_ok=True)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        save_atomically(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        (self.dirname / (self.filename or filename)).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) with every file written atomically. At the start of a
    run it removes temporary files a kill left behind, adopts per-epoch states already on disk (so the
    last ``n_saved`` are kept across a resume) and logs where each kind of checkpoint goes. Its
    ``state_dict`` is the best-metric record, so a resumed run only replaces the best model with a better one."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        self.n_saved = kwargs.get("n_saved")
        name = "checkpoint" if len(save_dict) > 1 else next(iter(save_dict))  # ignite's file naming
        self.basename = f"{kwargs['file_prefix']}_{name}" if kwargs.get("file_prefix") else name
        self._started = False
        for checkpoint, fixed_name in (
            (self._final_checkpoint, kwargs.get("final_filename")),
            (self._key_metric_checkpoint, kwargs.get("key_metric_filename")),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed_name)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self.started)

    def started(self, engine: Engine) -> None:
        if self._started:  # an evaluator starts again at every validation
            return
        self._started = True
        save_dir = Path(self.save_dir)
        for partial in save_dir.glob(f".*{PARTIAL_SUFFIX}"):
            logger.warning(f"removing {partial}: an unfinished checkpoint write from a killed run")
            partial.unlink()
        places = []
        if self._interval_checkpoint is not None:
            unit = "epoch" if self.epoch_level else "iteration"
            existing = numbered_checkpoints(save_dir, self.basename, unit)
            if self.n_saved is not None and len(existing) > self.n_saved:
                for _, old in existing[: -self.n_saved]:
                    logger.info(f"removing {old}: only the last {self.n_saved} training states are kept")
                    old.unlink()
                existing = existing[-self.n_saved :]
            self._interval_checkpoint.load_state_dict({"_saved": [(n, p.name) for n, p in existing]})
            kept = "every" if self.n_saved is None else f"the last {self.n_saved}"
            places.append(f"{kept} training states in {save_dir}/{self.basename}_{unit}=N.pt")
        if self._final_checkpoint is not None:
            places.append(f"the end-of-run state in {save_dir / self._final_filename}")
        if self._key_metric_checkpoint is not None:
            name = self._key_metric_checkpoint.save_handler.filename or "checkpoint_key_metric=*.pt"
            places.append(f"the best model in {save_dir / name}")
        logger.info(f"{type(engine).__name__} checkpoints: " + "; ".join(places))

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


def numbered_checkpoints(ckpt_dir: str | Path, basename: str = "checkpoint", unit: str = "epoch") -> list:
    """``(n, path)`` of every ``<basename>_<unit>=n.pt`` in ``ckpt_dir``, oldest first."""
    pattern = re.compile(rf"{re.escape(basename)}_{unit}=(\d+)\.pt")
    paths = Path(ckpt_dir).glob(f"{basename}_{unit}=*.pt")
    return sorted((int(m.group(1)), p) for p in paths if (m := pattern.fullmatch(p.name)))


def latest_checkpoint(ckpt_dir: str | Path, final_name: str = "stage2_last.pt", prefix: str = "checkpoint") -> str:
    """The newest full training state in ``ckpt_dir`` that loads: the end-of-run ``final_name`` or, after a
    crash or a kill, the last per-epoch ``<prefix>_epoch=N.pt``. Writes are atomic, but a file damaged
    some other way is skipped with a warning naming it, and the one before it is used."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [p for p in [ckpt_dir / final_name, *ckpt_dir.glob(f"{prefix}_epoch=*.pt")] if p.is_file()]
    if not candidates:
        raise SystemExit(f"error: {ckpt_dir}: no training state to resume from ({final_name} or {prefix}_epoch=N.pt)")
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            logger.warning(f"{path}: cannot be read ({type(e).__name__}: {e}); trying the one before it")
            continue
        logger.info(f"resuming from {path}")
        return str(path)
    raise SystemExit(f"error: {ckpt_dir}: no readable training state to resume from")
