"""Where a training step's time goes, inside the real engine (issue 37).

Each case builds the bundle exactly as a sweep run does (``research.bench.sweep``'s settings: configs,
data, overrides), attaches every handler its ``run`` list attaches, and trains one epoch. Its
iterations are clocked in three windows after ``--warm-up`` iterations:

- **clocked** (no profiler): wall time per step, split into data (the loader's ``next``), the
  iteration function, and each handler attached to the iteration events (the EMA update among them);
- **profiled** (``torch.profiler``): the iteration function's share of each ``uncol/<phase>``
  range (teachers, gate, student forward, losses, backward, optimiser; ``custom/engines/uncol.py``),
  scaled to the clocked iteration time so that the profiler's own overhead is not counted.

The student's forward + backward FLOPs (``torch.utils.flop_counter``) over its measured time give the
achieved GFLOP/s, set against this machine's fp32 matmul rate (the best of several 2048^3 ``torch.mm``).

    python -m research.bench.profile_steps --case stage2_2d [--warm-up 5 --steps 10] [--label before]
    python -m research.bench.profile_steps --report-only

Each case writes ``research/results/profile/<label>_<case>.json``; the tables go to research/results.md's
``step-profile`` section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from research.bench.report import replace_section
from research.bench.sweep import METHODS, PRETRAIN, ROOT, commit, portable, setting_overrides, train_configs

RESULTS = ROOT / "research" / "results" / "profile"
WORK = ROOT / "research" / "work" / "profile"

#: case -> sweep setting, stage (1: pretrain.json, 2: train.json) and method (its stage 1 distillation
#: and stage 2 overrides), at 10 % labels as in the sweeps' headline cells
CASES = {
    "stage1_2d": {"setting": "2d", "stage": 1, "method": "uncol"},
    "stage2_2d": {"setting": "2d", "stage": 2, "method": "uncol"},
    "stage2_2d_mean_teacher": {"setting": "2d", "stage": 2, "method": "mean_teacher"},
    "stage1_3d": {"setting": "3d_patch", "stage": 1, "method": "uncol", "bundle": {"embedded_data#num_train": 6}},
    "stage2_3d": {"setting": "3d_patch", "stage": 2, "method": "uncol", "bundle": {"embedded_data#num_train": 6}},
    "stage2_3d_mean_teacher": {
        "setting": "3d_patch",
        "stage": 2,
        "method": "mean_teacher",
        "bundle": {"embedded_data#num_train": 6},
    },
}
#: 3D cases train on 6 of the setting's 20 volumes (1 labelled, 5 unlabelled): a step's cost does not depend
#: on how many volumes there are, and the generalized teacher's warm-up (every slice of every unlabelled
#: volume through its encoder, before the first step) stays within minutes
FRACTION = 0.1
#: the iteration function's phases, as ``custom/engines/uncol.py`` names its ``record_function`` ranges
PHASES = (
    "specialized_teacher",
    "generalized_teacher",
    "gate",
    "student_forward",
    "losses",
    "backward",
    "optimiser",
)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate at torch's thread count: the best of ``repeats`` ``size``^3 products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class StepClock:
    """Wall time per iteration of an Ignite engine, split into data, the iteration function and each
    handler of the iteration events, over iterations ``first`` .. ``last`` (1-based, inclusive); with
    ``after``, also the iteration function's time over the ``after`` iterations that follow (profiled).

    It wraps the engine's process function and handlers in place, as Ignite's ``HandlersTimeProfiler``
    does, but keeps only the chosen window, so that the first iterations' one-time costs stay out.
    """

    ITERATION_EVENTS = ("GET_BATCH_STARTED", "GET_BATCH_COMPLETED", "ITERATION_STARTED", "ITERATION_COMPLETED")

    def __init__(self, first: int, last: int, after: int | None = None) -> None:
        self.first, self.last, self.after = first, last, after
        self.seconds: dict[str, float] = defaultdict(float)
        self._batch_start = 0.0
        self._iteration_start = 0.0

    def _in_window(self, engine) -> bool:
        return self.first <= engine.state.iteration <= self.last

    def attach(self, engine) -> None:
        from ignite.engine import Events

        process = engine._process_function

        def timed_process(eng, batch):
            start = time.perf_counter()
            out = process(eng, batch)
            if self._in_window(eng):
                self.seconds["iteration function"] += time.perf_counter() - start
            elif self.after is not None and self.last < eng.state.iteration <= self.last + self.after:
                self.seconds["iteration function, profiled"] += time.perf_counter() - start
            return out

        engine._process_function = timed_process
        for name in self.ITERATION_EVENTS:
            event = getattr(Events, name)
            handlers = engine._event_handlers[event]
            for i, (func, args, kwargs) in enumerate(handlers):
                handlers[i] = (self._timed_handler(func, _handler_name(func)), args, kwargs)
        # outermost: the first handler of ITERATION_STARTED and the last of ITERATION_COMPLETED
        engine._event_handlers[Events.GET_BATCH_STARTED].insert(0, (self._batch_started, (engine,), {}))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine._event_handlers[Events.ITERATION_STARTED].insert(0, (self._iteration_started, (engine,), {}))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _timed_handler(self, func, name: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = func(*args, **kwargs)
            engine = args[0] if args else None
            if engine is not None and hasattr(engine, "state") and self._in_window(engine):
                self.seconds[f"handler: {name}"] += time.perf_counter() - start
            return out

        return timed

    def _batch_started(self, engine) -> None:
        self._batch_start = time.perf_counter()

    def _batch_completed(self, engine) -> None:
        # the loader's next() runs between these events, before ITERATION_STARTED raises the count
        if self.first <= engine.state.iteration + 1 <= self.last:
            self.seconds["data"] += time.perf_counter() - self._batch_start

    def _iteration_started(self, engine) -> None:
        self._iteration_start = time.perf_counter()

    def _iteration_completed(self, engine) -> None:
        if self._in_window(engine):
            self.seconds["step (without data)"] += time.perf_counter() - self._iteration_start

    def per_step_ms(self) -> dict[str, float]:
        steps = self.last - self.first + 1
        return {k: round(1000 * v / steps, 1) for k, v in self.seconds.items()}


def _handler_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{func.__name__}"
    return getattr(func, "__qualname__", type(func).__name__)


class PhaseProfile:
    """``torch.profiler`` over iterations ``first`` .. ``last``: CPU time of each ``uncol/<phase>`` range."""

    def __init__(self, first: int, last: int, top_ops: int = 0) -> None:
        self.first, self.last, self.top_ops = first, last, top_ops
        self.profiler: torch.profiler.profile | None = None
        self.phase_ms: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED(once=self.first), self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.last), self._stop)

    def _start(self, engine) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()

    def _stop(self, engine) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        steps = self.last - self.first + 1
        for event in self.profiler.key_averages():
            if event.key.startswith(("uncol/", "teacher/")):
                phase = event.key.removeprefix("uncol/")
                # wall time of the range; on CUDA the device time is what a synchronised step waits for
                device = getattr(event, "device_time_total", 0.0) or 0.0
                self.phase_ms[phase] = max(event.cpu_time_total, device) / 1000 / steps
        if self.top_ops:
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.top_ops))


def student_step_flops(network: torch.nn.Module, batch_shape: list[int]) -> float:
    """FLOPs of one student forward + backward on a batch of ``batch_shape`` (``(B, C, *S)``)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(network.parameters()).device
    x = torch.randn(batch_shape, device=device)
    network.train()
    with FlopCounterMode(display=False) as counter:
        network(x).float().mean().backward()
    network.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def case_parser(case: str, warm_up: int, steps: int, root: Path, extra: dict | None = None):
    """The bundle's configuration for ``case``, as a sweep run builds it, with one epoch of
    ``2 * steps + warm_up`` iterations and no validation inside it."""
    from monai.bundle import ConfigParser

    spec = CASES[case]
    setting, method = spec["setting"], METHODS[spec["method"]]
    dataset = WORK / "data" / setting
    shared = setting_overrides(setting, FRACTION, 0, dataset, WORK / "teacher_cache" / setting)
    iterations = warm_up + 2 * steps
    configs = train_configs(setting)
    overrides = {**shared, "distillation": method["stage1"]}
    if spec["stage"] == 1:
        configs = [*configs, PRETRAIN]
        overrides.update(pretrain_epochs=1, max_epochs=1)
    else:
        overrides.update(method["stage2"], max_epochs=1, pretrain_epochs=1)
    overrides.update(iterations_per_epoch=iterations, val_interval=1000, **spec.get("bundle", {}), **(extra or {}))
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update({"bundle_root": str(root), **overrides})
    return parser, overrides


def profile_case(case: str, warm_up: int, steps: int, top_ops: int = 0, extra: dict | None = None) -> dict:
    spec = CASES[case]
    # stage 2 needs a stage 1 checkpoint: the bundle trains a one-epoch stage 1 first, which is kept, one
    # per student (the bundle refuses a checkpoint of another network)
    network = sorted((k.split("#")[1], v) for k, v in (extra or {}).items() if k.startswith("network_def#"))
    root = WORK / "_".join([case, *(f"{k}_{v}" for k, v in network)])
    if spec["stage"] == 1:
        shutil.rmtree(root, ignore_errors=True)
    else:
        for name in ("models/stage2_last.pt", "logs", "fingerprint.json", "plan.json"):
            path = root / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    parser, overrides = case_parser(case, warm_up, steps, root, extra)
    for i, _ in enumerate(parser["initialize"]):
        parser.get_parsed_content(f"initialize#{i}")
    run = parser["run"]
    for i in range(len(run) - 1):  # everything the run list attaches, then the trainer runs here
        parser.get_parsed_content(f"run#{i}")
    trainer = parser.get_parsed_content("train#trainer")
    clocked = (warm_up + 1, warm_up + steps)
    profiled = (warm_up + steps + 1, warm_up + 2 * steps)
    clock = StepClock(*clocked, after=steps)
    clock.attach(trainer)
    phases = PhaseProfile(*profiled, top_ops=top_ops)
    phases.attach(trainer)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start

    ms = clock.per_step_ms()
    iteration_ms = ms["iteration function"]
    breakdown = {"data": ms.get("data", 0.0)}
    # the iteration's phases as shares of the profiled iterations' time, scaled to the clocked iteration
    # time (the profiler's own overhead left out); what no range covers is "iteration (other)"
    profiled_iteration = max(ms["iteration function, profiled"], 1e-9)
    for phase in PHASES:
        if phase in phases.phase_ms:
            breakdown[phase] = round(phases.phase_ms[phase] / profiled_iteration * iteration_ms, 1)
    breakdown["iteration (other)"] = round(iteration_ms - sum(breakdown[p] for p in PHASES if p in breakdown), 1)
    # the generalized teacher's own parts (prompts from the EMA teacher, encoder cache, mask decoder, composition)
    for phase, value in sorted(phases.phase_ms.items()):
        if phase.startswith("teacher/"):
            share = value / profiled_iteration * iteration_ms
            breakdown[f"generalized_teacher: {phase.removeprefix('teacher/')}"] = round(share, 1)
    handlers = {k.removeprefix("handler: "): v for k, v in ms.items() if k.startswith("handler: ")}
    for name, value in sorted(handlers.items(), key=lambda kv: -kv[1]):
        if value >= 0.05:
            breakdown[f"handler: {name}"] = value
    step_ms = round(ms.get("data", 0.0) + ms["step (without data)"], 1)
    breakdown["handlers (other)"] = round(ms["step (without data)"] - iteration_ms - sum(handlers.values()), 1)

    network = parser.get_parsed_content("network")
    batch = parser.get_parsed_content("stage_batch_size")
    unlabelled = parser.get_parsed_content("plan").unlabelled_batch_size if spec["stage"] == 2 else 0
    roi = list(parser.get_parsed_content("plan").roi_size)
    student_batch = [batch + unlabelled, 1, *roi]
    flops = student_step_flops(network, student_batch)
    student_ms = breakdown.get("student_forward", 0.0) + breakdown.get("backward", 0.0)
    peak = matmul_gflops()
    return {
        "case": case,
        "commit": commit(),
        "setting": spec["setting"],
        "stage": spec["stage"],
        "method": spec["method"],
        "device": str(parser.get_parsed_content("device")),
        "threads": torch.get_num_threads(),
        "clocked_iterations": list(clocked),
        "profiled_iterations": list(profiled),
        "step_ms": step_ms,
        "breakdown_ms": breakdown,
        "student_batch": student_batch,
        "student_gflop_per_step": round(flops / 1e9, 2),
        "student_gflops": round(flops / 1e9 / (student_ms / 1000), 1) if student_ms else None,
        "matmul_peak_gflops": round(peak, 1),
        "seconds": round(seconds, 1),
        "overrides": portable(overrides),
    }


def table(results: Path = RESULTS) -> str:
    """One breakdown table per case (ms per step and share), every label side by side."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    if not runs:
        return "No profiles yet: `python -m research.bench.profile_steps --case stage2_2d`."
    lines: list[str] = []
    for case in CASES:
        found = sorted((r for r in runs if r["case"] == case), key=lambda r: r["label"] != "before")
        if not found:
            continue
        rows = list(dict.fromkeys(k for r in found for k in r["breakdown_ms"]))
        lines += [f"**{case}** ({found[0]['setting']} setting, stage {found[0]['stage']}, {found[0]['method']})", ""]
        lines.append("| part of the step | " + " | ".join(f"{r['label']} ({r['commit']}) ms" for r in found) + " |")
        lines.append("|---|" + "---|" * len(found))
        for row in rows:
            cells = []
            for r in found:
                value = r["breakdown_ms"].get(row)
                cells.append("" if value is None else f"{value:.1f} ({100 * value / r['step_ms']:.0f} %)")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:.1f}**" for r in found) + " |")
        flops = " | ".join(
            f"{r['student_gflop_per_step']} GFLOP at {r['student_gflops']} GFLOP/s "
            f"({100 * r['student_gflops'] / r['matmul_peak_gflops']:.0f} % of {r['matmul_peak_gflops']})"
            for r in found
        )
        lines += [f"| student forward + backward | {flops} |", ""]
    lines.append(
        "Milliseconds per step, mean over the clocked iterations (after the warm-up ones) of one epoch in the "
        "real engine with every handler of the bundle's run; the iteration's phases are `torch.profiler` "
        "shares of a second window, scaled to the clocked time. GFLOP/s: the student's forward + backward "
        "FLOPs over its forward + backward time, against this machine's fp32 `torch.mm` rate. "
        "Command: `python -m research.bench.profile_steps --case <case> --label <label>`."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="clocked steps (and as many profiled)")
    parser.add_argument("--label", default="before", help="names the code state in the table")
    parser.add_argument("--top-ops", type=int, default=0, help="print the profiled window's N costliest ops")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a bundle override to try")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        for case in args.case or list(CASES):
            result = {"label": args.label, **profile_case(case, args.warm_up, args.steps, args.top_ops, extra)}
            path = RESULTS / f"{args.label}_{case}.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps({k: result[k] for k in ("case", "step_ms", "breakdown_ms", "student_gflops")}, indent=1))
    replace_section(ROOT / "research" / "results.md", "step-profile", table())


if __name__ == "__main__":
    main()
