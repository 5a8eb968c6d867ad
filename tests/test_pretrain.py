"""Stage 1 through the bundle: distillation switches, optimiser contents, checkpoint, export."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIGS, TINY_NET, tiny_train_overrides
from monai.bundle import ConfigParser, ConfigWorkflow

TRAIN = str(CONFIGS / "train.json")
PRETRAIN = str(CONFIGS / "pretrain.json")


def _parser(tmp_path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([TRAIN, PRETRAIN])
    parser.update({**tiny_train_overrides(tmp_path), "teacher_cache_dir": str(tmp_path / "cache"), **overrides})
    return parser


@pytest.mark.parametrize(
    "mode, terms",
    [("none", set()), ("visual", {"visual"}), ("semantic", {"semantic"}), ("both", {"visual", "semantic"})],
)
def test_switches_remove_terms_and_their_parameters(tmp_path, mode, terms):
    parser = _parser(tmp_path, distillation=mode)
    iteration = parser.get_parsed_content("distillation_iteration")
    assert (iteration.visual is not None) == ("visual" in terms)
    assert (iteration.semantic is not None) == ("semantic" in terms)
    optimised = {id(p) for p in parser.get_parsed_content("optimizer").param_groups[0]["params"]}
    network = {id(p) for p in parser.get_parsed_content("network").parameters()}
    extra = {id(p) for p in iteration.modules.parameters()}
    assert optimised == network | extra
    if "visual" in terms:
        assert {id(p) for p in iteration.visual.parameters()} <= optimised
    if "semantic" in terms:
        assert {id(p) for p in iteration.semantic.adapter.parameters()} <= optimised
    if not terms:
        assert not extra


def test_an_unknown_distillation_setting_is_refused_not_read_as_none(lite_teacher):
    from custom.engines.uncol import DistillationIteration

    with pytest.raises(ValueError, match="distillation must be one of"):
        DistillationIteration.build("vsiual", lite_teacher, 2, 48, 3)
    with pytest.raises(ValueError, match="distillation_targets must be one of"):
        DistillationIteration.build("both", lite_teacher, 2, 48, 3, targets="cache")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny stage 1 run through the workflow `monai.bundle run pretrain` builds; returns its bundle root."""
    root = tmp_path_factory.mktemp("pretrain")
    workflow = ConfigWorkflow(
        config_file=[TRAIN, PRETRAIN],
        run_id="pretrain",
        **{**tiny_train_overrides(root), "teacher_cache_dir": str(root / "cache")},  # counted below: its own
    )
    workflow.initialize()
    workflow.run()
    output = workflow.parser.get_parsed_content("train#trainer").state.output
    workflow.finalize()
    return SimpleNamespace(root=root, output=output)


def test_stage1_run_writes_the_checkpoint_stage2_loads(pretrained):
    ckpt = pretrained.root / "models" / "pretrain.pt"
    assert ckpt.is_file()
    assert len(list((pretrained.root / "cache").rglob("*.pt"))) == 2  # stage 1 targets of the 2 labelled images, once


def test_exported_network_is_the_student_alone(pretrained):
    ckpt = pretrained.root / "models" / "pretrain.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "record"}  # the student's weights and what they were trained for
    assert saved["record"]["num_classes"] == 3 and saved["record"]["class_names"] == ["organ", "lesion"]
    state = saved["model"]
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(pretrained.root), "ckpt_path": str(ckpt), **TINY_NET})
    student = parser.get_parsed_content("network_def")  # the number of classes comes from the record
    assert set(state) == set(student.state_dict())  # no teacher, adapter or projection weights
    assert not any(k.startswith(("model.", "adapter", "projections", "teacher")) for k in state)
    student.load_state_dict(state, strict=True)
    scripted = torch.jit.script(student.eval())
    assert scripted(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)  # image in, logits out: no prompt


def test_each_loss_term_is_reported_in_the_engine_output(pretrained):
    out = pretrained.output[0]  # decollated by MONAI, as its handlers expect
    for term in ("loss_sup", "loss_visual", "loss_semantic"):
        assert isinstance(out[term], float) and 0 <= out[term] < 10
    assert out["loss"] == pytest.approx(out["loss_sup"] + out["loss_visual"] + out["loss_semantic"], rel=1e-4)


def test_per_view_targets_are_the_teachers_on_the_augmented_image(tmp_path):
    """``distillation_targets=per_view``: no cached targets; the iteration asks the teacher on the very
    (flipped) batch the student sees. Cached targets are flipped with the image instead, which is exact
    only for a flip-equivariant teacher (LiteMedSAM is not: research/bench/target_equivariance.py)."""
    from custom.teachers.targets import distillation_targets

    cached = _parser(tmp_path, distillation="both")
    per_view = _parser(tmp_path, distillation="both", distillation_targets="per_view")
    assert cached.get_parsed_content("distillation_iteration").teacher is None
    assert cached.get_parsed_content("teacher_targets") is not None
    iteration = per_view.get_parsed_content("distillation_iteration")
    assert iteration.teacher is not None and per_view.get_parsed_content("teacher_targets") is None
    per_view.get_parsed_content("embedded_data")  # writes the tiny phantoms
    item = per_view.get_parsed_content("train#dataset")[0]
    assert not [k for k in item if str(k).startswith("teacher_")]
    image, label = (torch.as_tensor(item[k])[None].flip(2) for k in ("image", "label"))  # training items are untracked
    grid = [n // 16 for n in image.shape[2:]]
    got = iteration._targets({}, image, label, grid)
    expected = distillation_targets(iteration.teacher(image, labels=label), grid)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
