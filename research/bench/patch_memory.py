"""Peak memory and time of a 3D stage 2 training step vs volume size, at one ``roi_size``.

    python -m research.bench.patch_memory [--sizes 96x96x96 256x256x128] [--roi 96 96 64] [--teachers specialized]
                                 [--steps 3] [--huge-pages on|off] [--out research/results/patch_memory.json]
    python -m research.bench.patch_memory --report-only   # results.md's patch-memory section from the JSONs

Each size runs in a fresh process: the bundle's train.json + train_3d.json on a dataset of that volume
size (custom/data/phantoms.py's own-data generator, 4 classes, at train_3d's spacing so no resampling changes it),
stage 2 built by the bundle's own parser. Memory is the process's resident set (``VmRSS``, sampled
every 5 ms): ``dataset_mb`` once the cached datasets hold their volumes, ``step_peak_mb`` the peak
during the training steps above that. Training memory should follow ``roi_size``, not the volume; the
resident dataset follows the volume by design (CacheDataset keeps the preprocessed volumes in RAM).
The student starts from random weights (memory and time do not depend on them). ``--huge-pages off``
runs the children with ``THP_MEM_ALLOC_ENABLE=0`` (custom/__init__.py turns it on by default), to
measure what transparent huge pages save; each run records the setting and the kernel's THP mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = ROOT / "bundle" / "configs"
RESULTS = ROOT / "research" / "results"
PAGE = ROOT / "research" / "results.md"
SPACING = (1.25, 1.25, 2.0)  # train_3d.json's pixdim
COUNTS = {"training": 2, "unlabeled": 2, "validation": 1}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Samples the resident set in a thread while the ``with`` block runs."""

    def __enter__(self) -> PeakRSS:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def kernel_thp_mode() -> str:
    """The kernel's transparent huge page mode (the bracketed word), or "unknown"."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.is_file() else ""
    return text.split("[")[1].split("]")[0] if "[" in text else "unknown"


def fresh_process(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (this script with ``--one ...``) in a new process and return the JSON it printed
    after ``RESULT``; exit with its error output if it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{Path(cmd[1]).stem}: {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def one_size(shape: tuple[int, ...], roi: list[int], teachers: str, steps: int) -> dict:
    """Build stage 2 on volumes of ``shape`` and time ``steps`` iterations (this process)."""
    import torch
    from monai.bundle import ConfigParser

    from custom.data.phantoms import write_own_data_example as write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_dataset(Path(tmp) / "data", [shape], SPACING, COUNTS)
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_3d.json")])
        parser.update(
            {
                "bundle_root": tmp,
                "use_embedded_data": False,
                "datalist": str(datalist),
                "roi_size": roi,
                "teachers": teachers,
                "teacher_cache_dir": None,
                "iterations_per_epoch": steps,
                "max_epochs": 1,
                "val_interval": 1000,
            }
        )
        trainer = parser.get_parsed_content("train#trainer")
        parser.get_parsed_content("ema").attach(trainer)
        dataset_mb = rss_mb()
        step_seconds: list[float] = []
        last = [time.perf_counter()]

        def record(_engine) -> None:
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now

        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_STARTED, lambda _e: last.__setitem__(0, time.perf_counter()))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
        with PeakRSS() as peak:
            trainer.run()
    return {
        "volume": list(shape),
        "roi_size": roi,
        "teachers": teachers,
        "dataset_mb": round(dataset_mb),
        "step_peak_mb": round(peak.peak),
        "step_peak_above_dataset_mb": round(peak.peak - dataset_mb),
        "seconds_per_step": [round(s, 2) for s in step_seconds],
        "threads": torch.get_num_threads(),
        "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "kernel_thp": kernel_thp_mode(),
    }


def section_text(results: Path = RESULTS) -> str:
    """results.md's ``patch-memory`` section from every committed ``patch_memory*.json`` (nothing written)."""
    rows = [
        "One process per volume size, each timing its own few steps (every step listed; no spread is "
        "shown). Memory is the process's resident set: once the cached datasets hold their volumes, and the "
        "peak during the steps above that.",
        "",
        "| JSON | volume | roi_size | stage 2 teachers | huge pages (`THP_MEM_ALLOC_ENABLE`) / kernel THP | "
        "resident with the datasets (MB) | step peak above that (MB) | seconds per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    payloads = [(path, json.loads(path.read_text())) for path in sorted(results.glob("patch_memory*.json"))]
    for path, payload in payloads:
        for r in payload["runs"]:
            rows.append(
                f"| `{path.name}` | {' × '.join(map(str, r['volume']))} | {' × '.join(map(str, r['roi_size']))} | "
                f"{r['teachers']} | {r['huge_pages']} / {r['kernel_thp']} | {r['dataset_mb']} | "
                f"{r['step_peak_above_dataset_mb']} | {', '.join(f'{x:g}' for x in r['seconds_per_step'])} |"
            )
    rows.append("")
    rows += [
        f"- `{path.name}`: `{payload['command'].strip()}` at commit {payload['commit'][:7]}, {payload['machine']}, "
        f"{payload['runs'][0].get('threads', 'n/a')} threads."
        for path, payload in payloads
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["96x96x96", "256x256x128"])
    parser.add_argument("--roi", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--teachers", default="specialized", choices=("specialized", "generalized", "both"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--huge-pages", default="on", choices=("on", "off"))
    parser.add_argument("--out", default=str(ROOT / "research" / "results" / "patch_memory.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one size, JSON to stdout
    parser.add_argument("--report-only", action="store_true", help="write results.md's section from the JSONs")
    parser.add_argument("--results-md", default=str(PAGE))
    args = parser.parse_args()
    if args.report_only:
        from research.bench.report import replace_section

        replace_section(Path(args.results_md), "patch-memory", section_text())
        print(section_text())
        return
    if args.one:
        shape = tuple(int(v) for v in args.one.split("x"))
        print("RESULT " + json.dumps(one_size(shape, args.roi, args.teachers, args.steps)))
        return
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if args.huge_pages == "on" else "0"}
    runs = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--roi", *map(str, args.roi), "--teachers", args.teachers]
        cmd += ["--steps", str(args.steps)]
        runs.append(fresh_process(cmd, f"size {size}", env))
        print(json.dumps(runs[-1]))
    from research.bench.sweep import commit as code_commit

    commit = code_commit()  # "-dirty" when the code differs from it: such a result is not committed
    result = {
        "command": "python -m research.bench.patch_memory " + " ".join(sys.argv[1:]),
        "commit": commit,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, no GPU",
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
