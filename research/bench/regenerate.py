"""Every generated section of research/results.md, research/real_data.md and README.md, from the committed JSONs.

    python -m research.bench.regenerate           # rewrite every section, and the plots, from research/results/
    python -m research.bench.regenerate --check   # name the sections that differ from the pages; write nothing

Each section comes from the script that measures it (its ``--report-only`` path or table function):
``sweep-<setting>`` from ``research/results/runs/<setting>/`` (sweep.py), ``gate-audit-<setting>`` from
``gate_audit_<setting>.json`` (gate_audit.py), the learning-curve, zero-shot and split sections from
``real/`` (real_report.py), ``component-audit`` (component_audit.py), ``patch-memory`` (patch_memory.py),
``fresh-clone`` (fresh_clone.py), ``plan-probes`` (plan_probe.py), ``step-profile`` (profile_steps.py),
``inference-speed`` (inference_speed.py), ``student-flops`` (student_flops.py), ``allocator``
(allocator.py), ``step-options`` (step_options.py), ``switch-probes`` (switch_probe.py), ``method-sweep``
(method_sweep.py), ``run-cost`` (run_cost.py) and ``uncol-summary`` (summary.py); README.md's
``uncol-answer`` (method_sweep.py's answer).
No training runs. research/tests/test_generated.py rebuilds the pages this way and fails on any
difference, and on any marked section no generator writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from research.bench import (
    allocator,
    component_audit,
    fresh_clone,
    gate_audit,
    inference_speed,
    method_sweep,
    patch_memory,
    plan_probe,
    profile_steps,
    real_report,
    run_cost,
    step_options,
    student_flops,
    summary,
    sweep,
    switch_probe,
)
from research.bench.report import replace_section

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT / "research"
RESULTS = RESEARCH / "results"


def results_sections(results: Path = RESULTS) -> dict[str, Callable[[], str]]:
    """results.md's sections: name -> a function giving its text from the JSONs under ``results``."""
    sections: dict[str, Callable[[], str]] = {summary.SECTION: lambda: summary.table(results)}
    for folder in sorted((results / "runs").iterdir()):
        if folder.is_dir():
            sections[f"sweep-{folder.name}"] = lambda s=folder.name: sweep.section_text(s, results)
    for path in sorted(results.glob("gate_audit_*.json")):
        setting = path.stem.removeprefix("gate_audit_")
        sections[f"gate-audit-{setting}"] = lambda p=path: gate_audit.table(json.loads(p.read_text()))
    for name in real_report.sections(results / "real"):
        sections[name] = lambda n=name: real_report.sections(results / "real")[n]
    sections["component-audit"] = lambda: component_audit.section_text(results / "component_audit")
    sections["patch-memory"] = lambda: patch_memory.section_text(results)
    sections["fresh-clone"] = lambda: fresh_clone.section_text(json.loads((results / "fresh_clone.json").read_text()))
    if (results / "plan_probe").is_dir():
        sections["plan-probes"] = lambda: plan_probe.table(results / "plan_probe")
    if (results / "run_cost.json").is_file():
        sections["run-cost"] = lambda: run_cost.table(json.loads((results / "run_cost.json").read_text()))
    if (results / "switch_probe").is_dir():
        sections["switch-probes"] = lambda: switch_probe.table(results / "switch_probe")
    if (results / "method_sweep").is_dir():
        sections[method_sweep.SECTION] = lambda: method_sweep.table(results / "method_sweep")
    if (results / "inference_speed.json").is_file():
        speed = results / "inference_speed.json"
        sections["inference-speed"] = lambda: inference_speed.table(json.loads(speed.read_text()))
    if (results / "allocator.json").is_file():
        kept = results / "allocator.json"
        sections[allocator.SECTION] = lambda: allocator.table(json.loads(kept.read_text()))
    if (results / "student_flops.json").is_file():
        flops = results / "student_flops.json"
        sections[student_flops.SECTION] = lambda: student_flops.table(json.loads(flops.read_text()))
    if (results / "step_options.json").is_file():
        options = results / "step_options.json"
        sections[step_options.SECTION] = lambda: step_options.table(json.loads(options.read_text()))
    if (results / "profile").is_dir():
        sections["step-profile"] = lambda: profile_steps.table(results / "profile")
    if (results / "diagnostics_2d.json").is_file():  # none is committed now (its run was from uncommitted code)
        from research.bench import diagnostics

        pngs = (results / "pseudo_label_audit_2d.png", results / "reliability_2d.png")
        payload = json.loads((results / "diagnostics_2d.json").read_text())
        sections["diagnostics-2d"] = lambda: diagnostics.summary(payload, *pngs, results.parent / "results.md")
    return sections


def data_sections(results: Path = RESULTS) -> dict[str, Callable[[], str]]:
    """real_data.md's sections."""
    return {"real-splits": lambda: real_report.split_table(results / "real")}


def readme_sections(results: Path = RESULTS) -> dict[str, Callable[[], str]]:
    """README.md's one generated section: the method sweep's answer, which links to results.md's table."""
    return {method_sweep.ANSWER_SECTION: lambda: method_sweep.answer(results / "method_sweep")}


def pages(research: Path = RESEARCH) -> dict[Path, dict[str, Callable[[], str]]]:
    """Each generated page (the research record's two and the README) and its sections, from ``research/results``."""
    results = research / "results"
    return {
        research / "results.md": results_sections(results),
        research / "real_data.md": data_sections(results),
        research.parent / "README.md": readme_sections(results),
    }


def plots(results: Path = RESULTS) -> None:
    """The figures the sections show: Dice vs labelled fraction per sweep setting, the learning curves."""
    for folder in sorted((results / "runs").iterdir()):
        if folder.is_dir():
            runs = sweep.load_runs(folder)
            title = f"Test Dice vs labelled fraction ({folder.name}; mean ± sample std over seeds)"
            sweep.plot(sweep.summarise(runs), sweep.plot_path(results, folder.name), title)
    for path in sorted((results / "real").glob("learning_curve_*.json")):
        task = path.stem.removeprefix("learning_curve_")
        real_report.plot_curve(json.loads(path.read_text()), path.with_suffix(".png"), task)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the pages; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for page, sections in pages().items():
        for name, text in sections.items():
            if args.check:
                from research.bench.report import section

                try:
                    if section(page.read_text(), name) != text().strip():
                        stale.append(f"{page.relative_to(ROOT)}: {name}")
                except KeyError:
                    stale.append(f"{page.relative_to(ROOT)}: {name} (no markers)")
            else:
                replace_section(page, name, text())
    if args.check:
        print("\n".join(stale) or "every generated section is up to date")
        sys.exit(1 if stale else 0)
    plots()
    print(f"rewrote {sum(len(s) for s in pages().values())} sections and the plots")


if __name__ == "__main__":
    main()
