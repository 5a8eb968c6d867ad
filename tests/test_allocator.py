"""Freed CPU memory kept in the process (custom/allocator.py): a reused block no longer page-faults."""

import subprocess
import sys

import pytest

from custom.allocator import keep_freed_memory

#: allocate, touch and free a 64 MiB tensor three times; print the minor page faults of the last two
CHURN = """
import resource, sys, torch
from custom.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, setting], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_without_page_faults():
    # by default malloc returns the 64 MiB to the kernel and each new tensor faults its pages in again: at
    # least one fault per 2 MiB (a huge page), 4 KiB pages where the kernel gives no huge pages
    default, kept = _faults("default"), _faults("kept")
    assert default >= 2 * 32
    assert kept * 10 < default


def test_disabled_changes_nothing():
    assert keep_freed_memory(enabled=False) is False


def test_every_workflow_sets_it_first():
    import json

    from tests.conftest import CONFIGS

    for name in ("train.json", "pretrain.json", "evaluate.json", "inference.json", "active_learning.json"):
        steps = json.loads((CONFIGS / name).read_text())["initialize"]
        assert steps[:2] == ["@import_custom_code", "@cpu_allocator"], name
