"""MONAI Label active-learning strategy: the unlabelled study UnCoL's two teachers are least sure of.

Runs inside MONAI Label's environment (``.venv-label``; it imports ``monailabel``), with the bundle
folder on ``sys.path``. Scores come from :func:`custom.active_learning.rank_cases` (teachers' mean
entropy plus their per-class disagreement) on the bundle's own networks and preprocessing: the
specialized teacher from ``models/stage2_last.pt`` (or the student in ``models/model.pt``) and the
generalized teacher of ``configs/train.json``. Scores are kept per image file (path and modification
time), so each request only scores studies it has not seen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import Dataset
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from custom.active_learning import load_specialized, rank_cases, specialized_checkpoint

logger = logging.getLogger(__name__)


class UnCoLUncertainty(Strategy):
    """Next study to label: the highest UnCoL uncertainty score among the datastore's unlabelled images."""

    def __init__(self, bundle_dir: str | Path, device: str | None = None) -> None:
        super().__init__("UnCoL: the study whose teachers are most uncertain or disagree most")
        self.bundle_dir = Path(bundle_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._parts: tuple | None = None
        self._scores: dict[tuple[str, int], dict] = {}

    def _load(self) -> tuple:
        """Specialized teacher, generalized teacher and preprocessing, built once from the bundle's configs."""
        if self._parts is None:
            configs = self.bundle_dir / "configs"
            parser = ConfigParser()
            parser.read_config([str(configs / "train.json"), str(configs / "active_learning.json")])
            parser.update({"bundle_root": str(self.bundle_dir), "device": f"$torch.device('{self.device}')"})
            checkpoint = specialized_checkpoint(self.bundle_dir / "models")
            specialized = load_specialized(parser.get_parsed_content("network"), checkpoint)
            self._parts = (
                specialized,
                parser.get_parsed_content("teacher_def"),
                parser.get_parsed_content("al_dataset#transform"),
            )
            logger.info(f"UnCoL strategy: specialized teacher from {checkpoint}")
        return self._parts

    def scores(self, paths: dict[str, str]) -> dict[str, dict]:
        """``{image id: score record}`` for ``{image id: file path}``, scoring only files not seen before."""
        specialized, generalized, transform = self._load()
        key = {i: (p, Path(p).stat().st_mtime_ns) for i, p in paths.items()}
        todo = [i for i in paths if key[i] not in self._scores]
        if todo:
            items = Dataset([{"image": paths[i]} for i in todo], transform=transform)
            by_path = {r["image"]: r for r in rank_cases(items, specialized, generalized, self.device)}
            for i in todo:
                self._scores[key[i]] = by_path[paths[i]]
        return {i: self._scores[key[i]] for i in paths}

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = self.scores({i: datastore.get_image_uri(i) for i in images})
        best = max(images, key=lambda i: scores[i]["score"])
        logger.info(f"UnCoL strategy: {best} (score {scores[best]['score']:.3f} of {len(images)} unlabelled)")
        return {"id": best, "score": scores[best]["score"]}
