"""Stage 1 run from stage 2 sees stage 2's whole configuration, with pretrain.json on top."""

from __future__ import annotations

import pytest
from conftest import CONFIGS
from monai.bundle import ConfigParser

from custom.engines.stages import calling_config, stage1_parser

TRAIN, TRAIN_3D, PRETRAIN, DIAGNOSTICS = (
    str(CONFIGS / n) for n in ("train.json", "train_3d.json", "pretrain.json", "diagnostics.json")
)


def test_calling_config_is_the_raw_configuration_of_the_running_parser():
    probe = {"_target_": "custom.engines.stages.calling_config"}
    parser = ConfigParser({"x": 1, "nested": {"y": "@x"}, "probe": probe})
    parser.update({"x": 2, "added_by_a_user": [1, 2]})
    seen = parser.get_parsed_content("probe")
    assert seen["x"] == 2 and seen["added_by_a_user"] == [1, 2] and seen["nested"] == {"y": "@x"}
    seen["x"] = 99  # a copy: stage 1 cannot change stage 2's configuration
    assert parser["x"] == 2


def test_calling_config_outside_a_config_is_an_error():
    with pytest.raises(RuntimeError, match="while a MONAI bundle config is being parsed"):
        calling_config()


def test_stage1_gets_every_file_and_override_of_stage2_and_pretrain_on_top():
    stage2 = ConfigParser()
    stage2.read_config([TRAIN, TRAIN_3D])
    overrides = {
        "ckpt_dir": "/somewhere/models",
        "class_names": ["gm", "wm_a", "wm_b"],
        "num_classes": 4,
        "roi_size": [64, 64, 32],
        "network_def#hidden_size": 96,
        "a_key_no_list_knows": "kept",
        "batch_size": 4,
        "pretrain_batch_size": 3,
    }
    stage2.update(overrides)
    stage1 = stage1_parser(stage2.get(), PRETRAIN)
    for key, value in overrides.items():  # both batch sizes too: both stages plan with the same values
        assert stage1[key] == value, key
    assert stage1["spatial_dims"] == 3 and stage1["axcodes"] == "RAS"  # train_3d.json came along
    pretrain = ConfigParser.load_config_file(PRETRAIN)
    assert (
        stage1["stage_batch_size"] == "$@plan.pretrain_batch_size" and stage2["stage_batch_size"] == "$@plan.batch_size"
    )
    handlers = [h["_target_"] for h in stage1["train#handlers"]]
    assert handlers == [h["_target_"] for h in pretrain["train#handlers"]]
    assert [r.replace("::", "#") for r in stage1["run"]] == pretrain["run"]  # MONAI may write ids with "::"
    assert stage1.get_parsed_content("ckpt_name") == "pretrain.pt"
    assert stage1.get_parsed_content("pretrain_ckpt") == "/somewhere/models/pretrain.pt"


def test_stage1_run_from_stage2_with_the_diagnostics_overlay_leaves_stage_2s_diagnostics_out():
    stage2 = ConfigParser()
    stage2.read_config([TRAIN, DIAGNOSTICS])
    assert stage2["train#diagnostics"]
    stage1 = stage1_parser(stage2.get(), PRETRAIN)
    assert stage1["train#diagnostics"] == []  # the audit needs stage 2's iteration
