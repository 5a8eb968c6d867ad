"""Handler measurements kept as JSON lines (custom/handlers/records.py)."""

import json

from ignite.engine import Engine, Events

from custom.handlers.records import StateRecords


def test_each_new_record_under_the_key_is_written_once(tmp_path):
    fits = iter([{"iteration": 0, "specialized": {"temperature": 2.0}}, {"iteration": 3, "specialized": {}}])
    engine = Engine(lambda e, b: None)

    @engine.on(Events.STARTED)
    @engine.on(Events.EPOCH_COMPLETED(every=2))
    def fit(e):  # what a measuring handler leaves on the engine: a new record each time it measures
        e.state.calibration = next(fits)
        e.state.reliability = {"iteration": e.state.iteration, "owners": ["specialized"]}

    calibration = StateRecords(tmp_path / "eval" / "calibration.jsonl", key="calibration")
    calibration.attach(engine)
    missing = StateRecords(tmp_path / "eval" / "nothing.jsonl", key="no_such_record")
    missing.attach(engine)
    engine.run([0] * 3, max_epochs=3)  # records at the start and after epoch 2; epochs 1 and 3 repeat the last
    lines = [json.loads(line) for line in (tmp_path / "eval" / "calibration.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 3] and lines[0]["specialized"]["temperature"] == 2.0
    assert not (tmp_path / "eval" / "nothing.jsonl").exists()  # a key no handler sets writes nothing
