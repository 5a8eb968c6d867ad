"""Give a second virtual environment the packages it shares with the first as hard links, not copies.

    python scripts/link_packages.py --source .venv --target .venv-label requirements-torch.txt constraints-label.txt

The MONAI Label environment (``make label-install``) needs the same torch, CUDA libraries, ITK and
much else as ``.venv``: installed again they cost about 7 GB, enough to fill a CI disk. Every
distribution installed in ``--source`` whose version is the one pinned (``name==version``) in the
given files is hard-linked, file by file from its ``RECORD``, into ``--target``'s site-packages;
pip in the target then finds it already satisfied and installs only the rest. Hard links are safe to
share: pip replaces or removes a file by name, never by writing into it, so neither environment can
change the other. Across filesystems the files are copied.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def canonical_name(name: str) -> str:
    """Package names as pip compares them (PEP 503): case and runs of ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(files: list[Path]) -> dict[str, str]:
    """``name==version`` lines of requirement/constraint files; anything else is ignored."""
    pins: dict[str, str] = {}
    for path in files:
        for line in path.read_text().splitlines():
            match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*(#.*)?", line)
            if match:
                pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def site_packages(venv: Path) -> Path:
    """The environment's own site-packages folder, as its interpreter reports it."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{venv}: no virtual environment there ({python} is missing)")
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def link_file(source: Path, target: Path) -> int:
    """Hard-link ``source`` at ``target`` (copy across filesystems); returns the bytes shared."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target, follow_symlinks=False)
        return source.lstat().st_size
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)
        return 0


def link_packages(source: Path, target: Path, pins: dict[str, str]) -> tuple[list[str], int]:
    """Link every distribution in site-packages ``source`` pinned at its installed version into
    site-packages ``target``. Returns the ``name==version`` list linked and the bytes shared."""
    target_versions = {
        canonical_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=[str(target)])
    }
    linked, shared = [], 0
    for dist in importlib.metadata.distributions(path=[str(source)]):
        name = canonical_name(dist.metadata["Name"])
        if pins.get(name) != dist.version or name in target_versions:  # pip decides about those
            continue
        if dist.files is None:  # no RECORD: pip will install it the usual way
            continue
        for entry in dist.files:
            if ".." in entry.parts:  # console scripts in bin/: they name the source interpreter
                continue
            file = source / entry
            if file.is_file():
                shared += link_file(file, target / entry)
        linked.append(f"{dist.metadata['Name']}=={dist.version}")
    return sorted(linked, key=str.lower), shared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="virtual environment to share from")
    parser.add_argument("--target", type=Path, required=True, help="virtual environment to share into")
    parser.add_argument("pins", type=Path, nargs="+", help="requirement or constraint files with name==version")
    args = parser.parse_args(argv)
    linked, shared = link_packages(site_packages(args.source), site_packages(args.target), read_pins(args.pins))
    print(
        f"{args.target}: {len(linked)} packages shared with {args.source} ({shared / 2**30:.1f} GiB as hard links)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
