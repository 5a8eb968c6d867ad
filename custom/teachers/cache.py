"""On-disk cache of the generalized teacher's outputs, with a size budget.

The image encoder is the teacher's expensive part and its output depends only on the image, the
model weights and the preprocessing, so it is computed once per un-augmented image and reused
across epochs and runs. Each consumer stores only what it reads: stage 2 (and anything that only
decodes masks) the image embedding; stage 1 its distillation targets already pooled to the
student's token grid (:class:`~custom.teachers.targets.TeacherTargetsd`). Entries live under
``<directory>/<fingerprint>/``; the fingerprint hashes what the entries depend on (model name,
checkpoint SHA-256, preprocessing, and for targets the prompt settings), so changing any of them
starts a fresh namespace. Keys hash the image's own pixels.

``budget_gb`` bounds the whole directory (every namespace): when a new entry would exceed it, the
least recently used entries (file modification time, refreshed on every hit) are deleted first. A
budget smaller than one run's working set makes the cache evict what it will need again: that is
logged once, with the figures to raise it to. A full disk never stops training: the entry is not
stored (logged once) and is recomputed when next needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

CACHE_FORMAT = 2  # 2: one entry holds only what its consumer reads (format 1 held every encoder output)
#: disk space left free for everything else (a cache write that would leave less is skipped)
DISK_RESERVE_BYTES = 256 * 2**20

logger = logging.getLogger(__name__)

#: per cache folder, its entries (least recently used first) and their sizes, shared by every
#: :class:`EncoderCache` of the folder in this process (the encoder's and stage 1's targets)
_FOLDER_INDEX: dict[Path, OrderedDict[Path, int]] = {}


def fingerprint(**parts) -> str:
    """Short stable hash of the JSON-serialisable ``parts`` (model, checkpoint digest, preprocessing)."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_key(*tensors: torch.Tensor) -> str:
    """Content hash of one or more tensors (each one's shape, dtype-independent values)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class EncoderCache:
    """Dictionary-like store of ``{name: tensor}`` entries, one file per image, written atomically.

    Floating tensors are stored as ``storage_dtype`` (float16 by default, halving disk use) and returned
    as float32; others (masks, indices) are stored as they are. A fresh computation is passed through the
    same rounding by :meth:`put`, so a hit returns exactly what the miss returned.

    Args:
        directory: the cache folder (the budget covers all of it).
        namespace: sub-folder of this kind of entry (a :func:`fingerprint`).
        storage_dtype: dtype of stored floating tensors.
        budget_gb: most gigabytes the folder may hold; ``None``: no limit.
    """

    def __init__(
        self,
        directory: str | Path,
        namespace: str,
        storage_dtype: torch.dtype = torch.float16,
        budget_gb: float | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.root = self.directory / namespace
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_dtype = storage_dtype
        self.budget_bytes = None if budget_gb is None else int(budget_gb * 1e9)
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"teacher cache budget must be positive, got {budget_gb} GB")
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self.skipped = 0
        self._written: set[Path] = set()  # entries this process stored: evicting one means thrashing
        self._warned: set[str] = set()

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
        self._touch(path)
        return {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``entry``; returns it as a later :meth:`get` will (floats rounded to the storage dtype)."""
        stored = {
            k: v.detach().to("cpu", self.storage_dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in entry.items()
        }
        returned = {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}
        payload = sum(v.numel() * v.element_size() for v in stored.values())
        if not self._disk_has_room(payload):
            return returned
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        path = self._path(key)
        try:
            torch.save(stored, tmp)
            if not self._make_room(Path(tmp).stat().st_size):
                return returned
            os.replace(tmp, path)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            self._skip("disk", f"teacher cache {self.directory}: the disk is full; entries are not stored")
            return returned
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._written.add(path)
        index = _FOLDER_INDEX.get(self.directory)
        if index is not None:
            index.pop(path, None)
            index[path] = path.stat().st_size
        return returned

    # -- budget -------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Bytes held by the whole cache folder."""
        return sum(self._entries().values())

    def _entries(self) -> OrderedDict[Path, int]:
        folder = self.directory
        if folder not in _FOLDER_INDEX:
            found = []
            for path in self.directory.glob("*/*.pt"):
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed meanwhile (another process evicting)
                    continue
                found.append((st.st_mtime, str(path), path, st.st_size))
            _FOLDER_INDEX[folder] = OrderedDict((path, size) for *_, path, size in sorted(found))
        return _FOLDER_INDEX[folder]

    def _touch(self, path: Path) -> None:
        if self.budget_bytes is None:
            return
        try:
            os.utime(path)
        except FileNotFoundError:  # evicted by another process since it was read: nothing to refresh
            return
        index = self._entries()
        if path in index:
            index.move_to_end(path)

    def _disk_has_room(self, size: int) -> bool:
        free = shutil.disk_usage(self.root).free
        if free - size >= DISK_RESERVE_BYTES:
            return True
        self._skip(
            "disk",
            f"teacher cache {self.directory}: {free / 1e6:.0f} MB free on its disk, entries are no longer "
            f"stored (they are recomputed when needed); free space or set teacher_cache_dir elsewhere",
        )
        return False

    def _make_room(self, size: int) -> bool:
        """Evict least recently used entries until ``size`` more bytes fit; False: do not store."""
        if self.budget_bytes is None:
            return True
        if size > self.budget_bytes:
            self._skip(
                "entry",
                f"teacher cache {self.directory}: one entry needs {size / 1e6:.1f} MB, more than the budget "
                f"teacher_cache_budget_gb={self.budget_bytes / 1e9:g}; nothing is stored",
            )
            return False
        index = self._entries()
        total = sum(index.values())
        while index and total + size > self.budget_bytes:
            path, freed = index.popitem(last=False)
            path.unlink(missing_ok=True)
            total -= freed
            self.evicted += 1
            if path in self._written and "thrash" not in self._warned:
                self._warned.add("thrash")
                kept = sum(1 for p in index if p in self._written)
                logger.warning(
                    "teacher cache %s: the budget %s is smaller than this run's working set (entries stored in "
                    "this run are evicted again, %d of them held now, about %.1f MB each): they will be "
                    "recomputed; raise teacher_cache_budget_gb (bundle/docs/teachers.md has the size formula)",
                    self.directory,
                    _gb(self.budget_bytes),
                    kept,
                    size / 1e6,
                )
        return True

    def _skip(self, reason: str, message: str) -> None:
        self.skipped += 1
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message)

    def stats(self) -> dict[str, float]:
        """Hits, misses, evictions, skipped writes and the folder's size (MB), for logs."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evicted": self.evicted,
            "skipped": self.skipped,
            "size_mb": round(self.size_bytes / 1e6, 1),
        }

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is stored (not counted as a hit or a miss; the entry is not read)."""
        return self._path(key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.pt"))
