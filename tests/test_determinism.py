"""Same seed, same config, same machine: two short runs give identical losses, the second served by the
teacher cache the first one filled (so a cache hit is exactly what the miss gave)."""

from __future__ import annotations

from conftest import CONFIGS, tiny_train_overrides
from ignite.engine import Events
from monai.bundle import ConfigParser


def _losses(root, cache) -> list[float]:
    """Stage 2 (which runs stage 1 first) on the tiny dataset; the total loss of every iteration."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({**tiny_train_overrides(root), "seed": 7, "teacher_cache_dir": str(cache)})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    parser.get_parsed_content("run")
    return losses


def test_two_runs_with_the_same_seed_give_identical_losses(tmp_path):
    first = _losses(tmp_path / "a", tmp_path / "cache")
    cached = sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache").rglob("*.pt"))
    second = _losses(tmp_path / "b", tmp_path / "cache")
    assert len(first) == 4 and cached  # the first run filled the cache
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache").rglob("*.pt")) == cached  # all hits
    assert first == second
