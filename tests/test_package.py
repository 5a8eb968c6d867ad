"""The package's import-time setting: huge pages for large CPU tensors, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _thp_setting_after_import(env: dict[str, str]) -> str:
    code = "import custom, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE', '<unset>'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_importing_the_package_turns_on_huge_pages_for_large_tensors():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _thp_setting_after_import(env) == "1"


def test_a_users_own_huge_page_setting_is_kept():
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    assert _thp_setting_after_import(env) == "0"
