"""What a new user's machine sees: install, demo and test times of a fresh clone, with the demo's Dice.

    python -m research.bench.fresh_clone [--skip-demo] [--out research/results/fresh_clone.json]
    python -m research.bench.fresh_clone --report-only      # results.md's fresh-clone section from the JSON

Clones this repository's HEAD into a temporary folder (committed files only) and, timing each step,
runs what README.md tells a user to: ``make install``, ``make demo``, ``make label-install`` and
``make test`` (as ``.ci/run`` does: the real-anatomy tests may not skip), then ruff. Writes the
seconds, the environments' sizes, the test summary line with the 20 slowest tests, and the demo's
test Dice per class (stage 1 and UnCoL students) to the JSON behind research/results.md's
``fresh-clone`` section. Nothing else may run on the machine meanwhile: the times are the point.
The step logs stay in ``<clone>/`` only if a step fails (its path is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def step(name: str, cmd: list[str], cwd: Path, logs: Path, env: dict | None = None) -> tuple[float, str]:
    """Run one step, its output to ``logs/<name>.log``; returns (seconds, output); stops on failure."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    (logs / f"{name}.log").write_text(output)
    print(f"{name}: {seconds:.0f} s (exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        sys.exit(f"fresh_clone: step {name} failed; its log: {logs / (name + '.log')}")
    return seconds, output


def folder_gb(*paths: Path) -> float:
    """Disk use of ``paths`` together (a file hard-linked from several of them counts once)."""
    out = subprocess.run(["du", "-sbc", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return round(int(out.splitlines()[-1].split()[0]) / 1e9, 2)


def test_summary(output: str) -> dict:
    """pytest's final summary line and its ``--durations`` table."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ passed", line)]
    slowest = []
    for line in output.splitlines():
        match = re.match(r"^\s*([0-9.]+)s (call|setup|teardown)\s+(\S+)", line)
        if match:
            slowest.append({"seconds": float(match.group(1)), "phase": match.group(2), "test": match.group(3)})
    return {"summary": lines[-1].strip("= ") if lines else None, "slowest": slowest}


def demo_dice(clone: Path) -> dict:
    reports = {"stage 1": "bundle/eval/report_stage1/report.json", "UnCoL (stage 2)": "bundle/eval/report/report.json"}
    out = {}
    for name, path in reports.items():
        metrics = json.loads((clone / path).read_text())["metrics"]["test_dice"]
        out[name] = {cls: round(v["mean"], 4) for cls, v in metrics.items()}
    return out


def section_text(result: dict) -> str:
    """results.md's fresh-clone section: what the JSON holds, as it holds it (its 20 slowest tests stay in
    the JSON)."""
    sec, disk, tests, demo = result["seconds"], result["disk_gb"], result["tests"], result["demo"]
    lines = [
        f'`results/fresh_clone.json`: commit `{result["commit"]}`, machine "{result["machine"]}", made by '
        f"`{result['command']}` (the script is `python -m research.bench.fresh_clone` today). One run.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| `{step}` | {value} |" for step, value in sec.items()],
        "",
        "| environment | GB on disk |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in disk.items()],
        "",
        f"`make test`'s summary line: {tests['summary']}.",
    ]
    if demo:
        dice = "; ".join(
            f"{name}: " + ", ".join(f"{cls} {v}" for cls, v in classes.items())
            for name, classes in demo["test_dice"].items()
        )
        lines += ["", f"`make demo`'s test Dice per class, as its two reports give it: {dice}."]
        if demo.get("reported_seconds") is not None:
            lines[-1] += f" The demo reported {demo['reported_seconds']} s itself."
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "research" / "results" / "fresh_clone.json"))
    parser.add_argument("--report-only", action="store_true", help="write results.md's section from --out")
    parser.add_argument("--results-md", default=str(ROOT / "research" / "results.md"))
    args = parser.parse_args()
    if args.report_only:
        from research.bench.report import replace_section

        replace_section(Path(args.results_md), "fresh-clone", section_text(json.loads(Path(args.out).read_text())))
        return
    commit = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        # the clone holds HEAD's committed files only, so the JSON's commit is exact either way
        print(f"fresh_clone: uncommitted changes are not in the clone; it measures commit {commit[:7]}")
    work = Path(tempfile.mkdtemp(prefix="uncol-fresh-"))
    clone, logs = work / "uncol", work / "logs"
    logs.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    seconds: dict[str, float] = {}
    seconds["make install"], _ = step("install", ["make", "install"], clone, logs)
    sizes = {".venv": folder_gb(clone / ".venv")}
    demo = None
    if not args.skip_demo:
        seconds["make demo"], output = step("demo", ["make", "demo"], clone, logs)
        demo = demo_dice(clone)
        match = re.search(r"demo finished in (\d+) s", output)
        demo = {"test_dice": demo, "reported_seconds": int(match.group(1)) if match else None}
    seconds["make label-install"], _ = step("label-install", ["make", "label-install"], clone, logs)
    both = folder_gb(clone / ".venv", clone / ".venv-label")
    sizes[".venv-label, beyond the files it hard-links from .venv"] = round(both - sizes[".venv"], 2)
    sizes[".venv-label alone"] = folder_gb(clone / ".venv-label")
    seconds["make test"], output = step("test", ["make", "test"], clone, logs, {"UNCOL_REQUIRE_REAL_DATA": "1"})
    tests = test_summary(output)
    for name, cmd in (("ruff check", ["ruff", "check", "."]), ("ruff format", ["ruff", "format", "--check", "."])):
        seconds[name], _ = step(name.replace(" ", "_"), [str(clone / ".venv" / "bin" / cmd[0]), *cmd[1:]], clone, logs)
    result = {
        "command": "python -m research.bench.fresh_clone" + (" --skip-demo" if args.skip_demo else ""),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "disk_gb": sizes,
        "tests": tests,
        "demo": demo,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "disk_gb")}, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
