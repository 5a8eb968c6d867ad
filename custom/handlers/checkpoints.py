"""Checkpoints that survive a kill: atomic writes, the last K training states and the best model, and
the newest complete state found again on resume."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from custom.data.plan import BUNDLE_BATCH, DEFAULT_MEMORY_GB, Plan, check_normalisation

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


# -- what a checkpoint was trained for ------------------------------------------------------------

#: fields a checkpoint's network cannot load without (a mismatch is never accepted)
ARCHITECTURE_FIELDS = ("spatial_dims", "num_classes", "network")
#: the network attributes that together fix its architecture
NETWORK_ATTRIBUTES = (
    "spatial_dims", "in_channels", "out_channels", "hidden_size", "mlp_dim", "num_heads", "num_layers",
    "feature_size", "decoder", "full_resolution",
)  # fmt: skip
#: attributes added after checkpoints recorded their network, with the value those were trained with
NETWORK_ATTRIBUTES_ADDED = {"full_resolution": "blocks"}


def describe_network(network: torch.nn.Module) -> dict:
    """The architecture of a student network, as plain values (class name and constructor settings)."""
    return {"class": type(network).__name__, **{k: getattr(network, k, None) for k in NETWORK_ATTRIBUTES}}


def labelled_fingerprint(items: list[dict]) -> str:
    """Fingerprint of a labelled training set: the number of cases and a SHA-256 over each case's image
    file name and label file content (moving the dataset to another folder keeps it; changing, adding
    or removing a labelled case changes it)."""
    digest = hashlib.sha256()
    for name, label in sorted((Path(item["image"]).name, str(item["label"])) for item in items):
        digest.update(name.encode() + b"\0" + hashlib.sha256(Path(label).read_bytes()).digest())
    return f"{len(items)} cases, sha256 {digest.hexdigest()[:16]}"


class TrainingRecord:
    """What a checkpoint was trained for, saved in every checkpoint the bundle writes (key ``record``)
    and checked before one is loaded, so a checkpoint is never applied to data it was not trained for.

    Fields left ``None`` are unknown to the config at hand and not compared (inference knows no
    labelled cases). ``state_dict``/``load_state_dict`` make it a checkpoint entry for MONAI's savers
    and loaders; loading a state that does not match stops the run.

    Args:
        network: the student (spatial dims, classes and size are read from it).
        axcodes: orientation the images are resampled to.
        pixdim: voxel size the images are resampled to.
        class_names: foreground class names.
        labelled: the labelled training cases (``image``/``label`` dicts) to fingerprint.
        normalisation: the intensity normalisation (a plan's ``normalisation``).
        roi_size: the training patch, inference's sliding window (kept, not compared).
        plan: the whole training plan (:class:`custom.data.plan.Plan`), kept for evaluation (not compared).
    """

    #: fields saved for later use, not compared: a stage may train with another patch or batch size
    KEPT_ONLY = ("roi_size", "plan")

    def __init__(
        self,
        network: torch.nn.Module,
        axcodes: str | None = None,
        pixdim: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        labelled: list[dict] | None = None,
        normalisation: Mapping | None = None,
        roi_size: Sequence[int] | None = None,
        plan: Plan | Mapping | None = None,
    ) -> None:
        self.network = network
        self.normalisation = None if normalisation is None else check_normalisation(normalisation)
        self.roi_size = None if roi_size is None else [int(r) for r in roi_size]
        self.plan = plan.to_dict() if isinstance(plan, Plan) else plan
        self.axcodes = axcodes
        self.pixdim = pixdim
        self.class_names = class_names
        self.labelled = labelled
        self._fingerprint: str | None = None

    def state_dict(self) -> dict:
        if self.labelled is not None and self._fingerprint is None:
            self._fingerprint = labelled_fingerprint(self.labelled)
        network = describe_network(self.network)
        record = {
            "spatial_dims": network["spatial_dims"],
            "num_classes": network["out_channels"],
            "network": network,
            "axcodes": self.axcodes,
            "pixdim": None if self.pixdim is None else [float(p) for p in self.pixdim],
            "class_names": None if self.class_names is None else list(self.class_names),
            "labelled_cases": self._fingerprint,
            "normalisation": self.normalisation,
            "roi_size": self.roi_size,
            "plan": self.plan,
        }
        return {k: v for k, v in record.items() if v is not None}

    def load_state_dict(self, state: dict) -> None:
        problems = self.differences(state)
        if problems:
            raise SystemExit(f"error: the checkpoint being loaded was trained for other data: {'; '.join(problems)}")

    def differences(self, recorded: dict | None, fields: Sequence[str] | None = None) -> list[str]:
        """What differs between ``recorded`` and this config, as ``"<field> <recorded> here <this>"``."""
        if recorded is None:
            return ["it has no training record (written by another tool or an older version of this bundle)"]
        expected = self.state_dict()
        out = []
        for key in fields or [k for k in expected if k not in self.KEPT_ONLY]:
            if key in expected and recorded.get(key) != expected[key]:
                if key == "network":
                    was, now = {**NETWORK_ATTRIBUTES_ADDED, **(recorded.get(key) or {})}, expected[key]
                    if was == now:
                        continue
                    changed = [f"{k} {was.get(k)} here {now.get(k)}" for k in now if was.get(k) != now.get(k)]
                    out.append("network " + ", ".join(changed))
                else:
                    out.append(f"{key} {recorded.get(key)} here {expected[key]}")
        return out

    def check(self, path: str | Path, fields: Sequence[str] | None = None, advice: str = "") -> None:
        """Stop with one line naming ``path`` and what differs, when the checkpoint at ``path`` was trained
        for something else than this config (only ``fields`` compared, when given)."""
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: checkpoint file does not exist")
        problems = self.differences(read_record(path), fields)
        if problems:
            raise SystemExit(f"error: {path}: {'; '.join(problems)}{'; ' + advice if advice else ''}")


def read_record(path: str | Path) -> dict | None:
    """The training record saved in a bundle checkpoint, ``None`` when it has none (plain state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    record = state.get("record") if isinstance(state, dict) else None
    return record if isinstance(record, dict) else None


def recorded_value(path: str | Path, key: str, default: object = None, missing: object = None) -> object:
    """One field of a checkpoint's training record, so inference takes e.g. the number of classes from
    the model it runs. ``default`` stands in while there is no checkpoint file yet (model-zoo tools
    build the network from the config alone); ``missing`` for a record written before the field was
    (what those checkpoints were trained with); otherwise a checkpoint without the field stops the run."""
    if not Path(path).is_file() and default is not None:
        return default
    record = read_record(path) if Path(path).is_file() else None
    if record is not None and key not in record and missing is not None:
        return missing
    if record is None or key not in record:
        raise SystemExit(f"error: {path}: no training record with '{key}'; give --{key} on the command line")
    return record[key]


def recorded_network(path: str | Path, default: Mapping | None = None) -> dict:
    """The student architecture a checkpoint's record names (:func:`describe_network`), with attributes
    added since it was written at the value it was trained with; ``default`` while there is no file."""
    if default is None and not Path(path).is_file():
        raise SystemExit(f"error: {path}: checkpoint file does not exist")
    network = recorded_value(path, "network", default=default)
    return {**NETWORK_ATTRIBUTES_ADDED, **network}


def recorded_plan(path: str | Path, **overrides: object) -> Plan:
    """The plan a checkpoint was trained with (its record's ``plan``), so evaluation and ranking see the
    images as training did; ``overrides`` (``None``: not given) replace its fields. A record from before
    plans were recorded gives one rebuilt from its spacing, orientation and normalisation (the
    whole-image z-score, if it names none), with ``roi_size`` given; else the run stops with one line."""
    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: checkpoint file does not exist")
    record = read_record(path) or {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "normalisation" in given:
        given["normalisation"] = check_normalisation(given["normalisation"])
    if "plan" in record:
        plan = Plan.from_dict(record["plan"])
        return dataclasses.replace(plan, **given, overridden=sorted({*plan.overridden, *given}))
    roi_size = given.get("roi_size", record.get("roi_size"))
    if roi_size is None or any(k not in record for k in ("spatial_dims", "pixdim", "axcodes")):
        raise SystemExit(
            f"error: {path}: its training record holds no plan; give --roi_size (and retrain to record one)"
        )
    fields = {
        "spatial_dims": record["spatial_dims"],
        "pixdim": record["pixdim"],
        "axcodes": record["axcodes"],
        "roi_size": roi_size,
        "normalisation": check_normalisation(record.get("normalisation", "zscore")),
        **BUNDLE_BATCH,
        "memory_budget_gb": DEFAULT_MEMORY_GB,
        "modality": "unknown",
        "class_fractions": {},
        "fingerprint": {},
        "notes": {"source": f"rebuilt from the training record of {path}, which holds no plan"},
    }
    return Plan(**{**fields, **given, "overridden": sorted(given)})


def student_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The student weights of a bundle checkpoint: ``model`` of a recorded checkpoint, else the file's
    plain state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state


#: the checkpoints a training run writes in its ``ckpt_dir``
BUNDLE_CHECKPOINTS = ("pretrain.pt", "model.pt", "stage2_last.pt", "checkpoint_epoch=*.pt")


def check_checkpoint_dir(ckpt_dir: str | Path, record: TrainingRecord, same_data: bool = True) -> str:
    """Stop before anything is written when ``ckpt_dir`` holds a checkpoint of another training (other
    classes, network, geometry or labelled cases): this run would replace it, or resume or start from
    it. With ``same_data`` False (MONAI Label's own labelled pairs refine the bundle's model on
    purpose) the labelled cases may differ. Returns ``ckpt_dir``."""
    fields = None if same_data else [f for f in record.state_dict() if f not in ("labelled_cases", *record.KEPT_ONLY)]
    for pattern in BUNDLE_CHECKPOINTS:
        for path in sorted(Path(ckpt_dir).glob(pattern)):
            record.check(
                path,
                fields,
                "it belongs to another training: use a fresh --ckpt_dir (or --fine_tune_from it with a fresh one)",
            )
    return str(ckpt_dir)
