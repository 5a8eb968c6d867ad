"""Same seed, same config, same machine: two short runs give identical losses."""

from __future__ import annotations

from conftest import CONFIGS, tiny_train_overrides
from ignite.engine import Events
from monai.bundle import ConfigParser


def _losses(root) -> list[float]:
    """Stage 2 (which runs stage 1 first) on the tiny dataset; the total loss of every iteration."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({**tiny_train_overrides(root), "seed": 7})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    parser.get_parsed_content("run")
    return losses


def test_two_runs_with_the_same_seed_give_identical_losses(tmp_path):
    first, second = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(first) == 4
    assert first == second
