"""scripts/link_packages.py: the MONAI Label environment shares pinned packages with .venv as hard links."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import link_packages  # noqa: E402


def _fake_distribution(site: Path, name: str, version: str) -> Path:
    """An installed distribution as pip leaves it: the package, its dist-info and a RECORD naming both
    (and a console script outside site-packages, which must not be shared)."""
    package = site / name
    package.mkdir()
    (package / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    (info / "RECORD").write_text(
        f"{name}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n../../../bin/{name},,\n"
    )
    return package / "__init__.py"


@pytest.fixture
def environments(tmp_path):
    paths = []
    for name in ("source", "target"):
        venv.create(tmp_path / name, with_pip=False)
        paths.append(tmp_path / name)
    return paths


def test_pinned_packages_are_hard_linked_and_importable(environments, tmp_path):
    source, target = environments
    source_site, target_site = link_packages.site_packages(source), link_packages.site_packages(target)
    shared = _fake_distribution(source_site, "shared_pkg", "1.0")
    _fake_distribution(source_site, "newer_pkg", "3.0")
    pins = tmp_path / "constraints.txt"
    pins.write_text("# lock\nShared.Pkg==1.0\nnewer-pkg==2.0\n")

    link_packages.main(["--source", str(source), "--target", str(target), str(pins)])

    linked = target_site / "shared_pkg" / "__init__.py"
    assert linked.stat().st_ino == shared.stat().st_ino, "shared as a hard link, not a copy"
    assert not (target_site / "newer_pkg").exists(), "a version other than the pinned one is left to pip"
    assert not (target / "bin" / "shared_pkg").exists()
    probe = "import importlib.metadata as m, shared_pkg; print(m.version('shared-pkg'))"
    out = subprocess.run(
        [str(target / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1.0"

    # Removing the package from the target (what pip uninstall does) leaves the source whole.
    linked.unlink()
    assert shared.read_text() == "VERSION = '1.0'\n"


def test_packages_already_in_the_target_are_left_to_pip(environments, tmp_path):
    source, target = environments
    _fake_distribution(link_packages.site_packages(source), "shared_pkg", "1.0")
    own = _fake_distribution(link_packages.site_packages(target), "shared_pkg", "0.9")
    pins = tmp_path / "pins.txt"
    pins.write_text("shared-pkg==1.0\n")
    link_packages.main(["--source", str(source), "--target", str(target), str(pins)])
    assert own.read_text() == "VERSION = '0.9'\n"


def test_a_missing_environment_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nowhere: no virtual environment there"):
        link_packages.site_packages(tmp_path / "nowhere")
