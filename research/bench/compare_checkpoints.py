"""Are two trained students the same? Largest absolute weight difference, and the records' commits.

    python -m research.bench.compare_checkpoints A.pt B.pt [--out result.json]

Used to check that a stage 1 retrained in another process, at another commit, equals the first
(cross-process determinism, and that the code changes in between left stage 1 alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from custom.handlers.checkpoints import student_state
from research.bench.gate_audit import stage1_provenance

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    args_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args_.add_argument("a")
    args_.add_argument("b")
    args_.add_argument("--out", default=None)
    args = args_.parse_args(argv)
    a, b = (student_state(p) for p in (args.a, args.b))  # tensors only: weights_only=True
    if set(a) != set(b):
        raise SystemExit(f"error: {args.b}: other parameter names than {args.a}")
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
    worst = max(diffs, key=diffs.get)
    record = {
        "command": "python -m research.bench.compare_checkpoints "
        + " ".join(
            f"{stage1_provenance(str(Path(x).parent.parent))['path']}/models/{Path(x).name}" for x in (args.a, args.b)
        ),
        "a": stage1_provenance(str(Path(args.a).parent.parent)),
        "b": stage1_provenance(str(Path(args.b).parent.parent)),
        "tensors": len(diffs),
        "identical": all(v == 0.0 for v in diffs.values()),
        "max_abs_difference": diffs[worst],
        "worst_tensor": worst,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
