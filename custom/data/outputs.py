"""Output folders checked before any compute: writable, and never the place of an input file.

Configs call :data:`bundle_writable_dirs` and :data:`bundle_spare_inputs` in ``initialize``, so an
unwritable folder or an output that would replace an input stops the run with one message naming
the path, before training or inference time is spent and before anything is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from custom.data.datalist import DatalistError, exit_on_error


def writable_dirs(paths: Sequence[str | Path]) -> list[str]:
    """Create each folder if needed and check that a file can be written in it; returns the paths."""
    for path in map(Path, paths):
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as err:
            raise DatalistError(f"{path}: output folder is not writable ({type(err).__name__}: {err})") from err
    return [str(p) for p in paths]


def output_path(image: str | Path, output_dir: str | Path, postfix: str, ext: str = ".nii.gz") -> Path:
    """Where MONAI's ``SaveImaged`` (``separate_folder=False``) writes the result for ``image``."""
    name = Path(image).name
    for known in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(known):
            name = name[: -len(known)]
            break
    return Path(output_dir) / f"{name}{'_' + postfix if postfix else ''}{ext}"


def spare_inputs(items: list[dict], output_dir: str | Path, postfix: str, ext: str = ".nii.gz") -> list[dict]:
    """``items`` unchanged, after checking that no output would replace an input file or another
    case's output (two inputs with the same name in different folders)."""
    inputs = {Path(item["image"]).resolve() for item in items}
    written: dict[Path, str] = {}
    for item in items:
        target = output_path(item["image"], output_dir, postfix, ext).resolve()
        if target in inputs:
            raise DatalistError(f"{target}: the segmentation of {item['image']} would overwrite an input image")
        if target in written:
            raise DatalistError(f"{target}: {item['image']} and {written[target]} would both be written here")
        written[target] = item["image"]
    return items


#: what configs call
bundle_writable_dirs = exit_on_error(writable_dirs)
bundle_spare_inputs = exit_on_error(spare_inputs)
