"""Stage 2 says so when its kept pseudo-labels hold none of a class the labelled data have."""

import logging

from test_semi_supervised import _step_setup

from custom.handlers.pseudo_label_coverage import PseudoLabelCoverage

LOGGER = "custom.handlers.pseudo_label_coverage"


def _run(caplog, unsup_weight: float = 1.0, epochs: int = 2) -> tuple[PseudoLabelCoverage, object]:
    # the pixelwise EMA teacher's logits are (-2x, 2x, 0.5x): class 1 or 0, never class 2 ("lesion")
    trainer, step, *_ = _step_setup()
    step.set_schedule("entropy_threshold", 2.0)
    step.set_schedule("unsup_weight", unsup_weight)
    coverage = PseudoLabelCoverage(step, ["organ", "lesion"])
    coverage.attach(trainer)
    trainer.state.max_epochs = epochs
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.run()
    return coverage, step


def test_a_class_no_teacher_predicts_is_warned_about_once(caplog):
    coverage, step = _run(caplog)
    kept, labelled = step.class_voxels  # the last epoch's counts
    assert kept[1] > 0 and kept[2] == 0 and labelled[2] > 0
    assert kept.sum() == 2 * 32 * 32 and labelled.sum() == 2 * 32 * 32  # one batch an epoch, all kept
    assert coverage.missing() == [2]
    assert caplog.text.count("hold no voxel of 'lesion'") == 1 and "'organ'" not in caplog.text
    assert "stage 2, epoch 1:" in caplog.text


def test_nothing_is_said_while_the_pseudo_label_weight_is_zero(caplog):
    coverage, _ = _run(caplog, unsup_weight=0.0, epochs=1)
    assert coverage.missing() == [2] and caplog.text == ""


def test_the_counts_restart_at_every_epoch(caplog):
    coverage, step = _run(caplog, epochs=1)
    assert step.class_voxels.kept is not None
    coverage.reset()
    assert step.class_voxels == (None, None) and coverage.missing() == []
