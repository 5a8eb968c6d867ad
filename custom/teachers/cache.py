"""On-disk cache of the generalized teacher's image-encoder outputs.

The image encoder is the teacher's expensive part and its output depends only on the image, the
model weights and the preprocessing, so it is computed once per un-augmented image and reused
across epochs and runs. Entries live under ``<directory>/<fingerprint>/``; the fingerprint hashes
the model name, the checkpoint's SHA-256 and the preprocessing, so changing any of them starts a
fresh namespace (old namespaces stay on disk until deleted). Keys hash the image's own pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

CACHE_FORMAT = 1


def fingerprint(**parts) -> str:
    """Short stable hash of the JSON-serialisable ``parts`` (model, checkpoint digest, preprocessing)."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_key(image: torch.Tensor) -> str:
    """Content hash of one image tensor (its shape, dtype and pixel bytes)."""
    t = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha1(str(tuple(t.shape)).encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class EncoderCache:
    """Dictionary-like store of ``{name: tensor}`` entries, one file per image, written atomically.

    Tensors are stored as ``storage_dtype`` (float16 by default, halving disk use) and returned as
    float32; a fresh computation is passed through the same rounding by :meth:`put`, so a hit returns
    exactly what the miss returned.
    """

    def __init__(self, directory: str | Path, namespace: str, storage_dtype: torch.dtype = torch.float16) -> None:
        self.root = Path(directory) / namespace
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_dtype = storage_dtype
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return {k: v.float() for k, v in stored.items()}

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``entry``; returns it as a later :meth:`get` will (rounded to the storage dtype)."""
        stored = {k: v.detach().to("cpu", self.storage_dtype).contiguous() for k, v in entry.items()}
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(stored, tmp)
            os.replace(tmp, self._path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return {k: v.float() for k, v in stored.items()}

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.pt"))
