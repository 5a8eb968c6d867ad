"""A handler's measurements left on the engine's state, kept as JSON lines (a diagnostic).

Some stage-2 handlers measure something at a few moments of training and leave the result on
``engine.state`` for the others: temperature calibration its fit (``engine.state.calibration``), the
reliability handler each teacher's Dice per class and the owners (``engine.state.reliability``).
:class:`StateRecords` appends each new one to a file, so that a run keeps what decided its gate;
``diagnostics.json`` wires one per key.
"""

from __future__ import annotations

import json
from pathlib import Path

from ignite.engine import Engine, Events


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` (created with its folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class StateRecords:
    """Append ``engine.state.<key>`` to the JSON-lines ``output_file`` each time a handler leaves a new
    record there (looked at when the run starts and after every epoch; a record already written is not
    written again). Attach it after the handler that sets the key."""

    def __init__(self, output_file: str | Path, key: str) -> None:
        self.output_file = Path(output_file)
        self.key = key
        self._written: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        record = getattr(engine.state, self.key, None)
        if record is None or record is self._written:
            return
        append_record(self.output_file, record)
        self._written = record
