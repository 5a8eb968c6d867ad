"""The package: its import-time setting (huge pages for large CPU tensors, unless the user chose), and
modules that import each other in one direction only."""

from __future__ import annotations

import ast
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


def _imports_of_custom() -> dict[str, set[str]]:
    """``{module: custom modules it imports}`` for every module of ``custom/`` (imports inside functions too)."""
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "custom").rglob("*.py")}  # fmt: skip
    graph = {}
    for module, path in paths.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[module] = {n for n in names if n in paths and n != module}
    return graph


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = _imports_of_custom()
    assert "custom.data.datalist" in graph["custom.data.phantoms"]  # the walk sees imports

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, f"modules on an import cycle: {cycles}"
