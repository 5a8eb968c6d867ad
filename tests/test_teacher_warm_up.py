"""The warm-up fills the teacher cache with exactly the crops stage 2 will ask for, each encoded once."""

import logging

import pytest
import torch
from ignite.engine import Engine

from custom.data.crops import RandGridCropd, tile_starts
from custom.handlers.teacher_warm_up import TeacherCacheWarmUp
from custom.teachers.cache import image_key
from custom.teachers.generalized import GeneralizedTeacher


def _count_encoded(teacher: GeneralizedTeacher) -> list[int]:
    encoded = [0]
    teacher.model.image_encoder.register_forward_hook(
        lambda m, args, out: encoded.__setitem__(0, encoded[0] + len(args[0]))
    )
    return encoded


def _warm(teacher, images: dict[str, torch.Tensor], roi_size, **kwargs) -> TeacherCacheWarmUp:
    """Run the warm-up on in-memory images (the transform looks them up by name, as LoadImaged would)."""
    datalist = [{"image": name} for name in images]
    load = lambda d: {"image": images[d["image"]]}  # noqa: E731
    warm = TeacherCacheWarmUp(teacher, datalist, load, roi_size, progress=False, **kwargs)
    engine = Engine(lambda e, b: None)
    warm.attach(engine)
    engine.run([0], max_epochs=1)
    return warm


def test_tile_starts_cover_the_axis_and_end_flush():
    assert tile_starts(32, 32) == [0]
    assert tile_starts(48, 32) == [0, 16]
    assert tile_starts(96, 32) == [0, 32, 64]
    assert tile_starts(112, 32) == [0, 32, 64, 80]


def test_2d_warm_up_caches_every_tile_crop_training_can_draw(tmp_path, caplog):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    encoded = _count_encoded(teacher)
    torch.manual_seed(0)
    images = {
        "wide": torch.randn(1, 48, 64),  # tiles at rows 0, 16 and columns 0, 32: 4 crops
        "blank_a": torch.zeros(1, 32, 32),  # one crop, the same content twice: encoded once
        "blank_b": torch.zeros(1, 32, 32),
    }
    with caplog.at_level(logging.INFO, logger="custom.handlers.teacher_warm_up"):
        warm = _warm(teacher, images, (32, 32))
    assert encoded[0] == 5 and len(teacher.cache) == 5
    assert warm.summary | {"seconds": 0, "cache_gb": 0} == {
        "images": 3, "slice_crops": 5, "cached": 0, "encoded": 5, "seconds": 0, "cache_gb": 0,
    }  # fmt: skip
    assert "5 distinct slice crops, 0 already cached, 5 encoded" in caplog.text
    # whatever tile stage 2's random crop draws, its key is in the cache
    crop = RandGridCropd("image", (32, 32), tiles=True)
    crop.set_random_state(0)
    drawn = {image_key(crop({"image": images["wide"]})["image"]) for _ in range(40)}
    assert len(drawn) == 4 and all(k in teacher.cache for k in drawn)
    # a second warm-up (a resumed run) finds everything and encodes nothing
    again = _warm(teacher, images, (32, 32))
    assert encoded[0] == 5 and again.summary["cached"] == 5 and again.summary["encoded"] == 0


def test_3d_warm_up_encodes_the_slices_of_each_in_plane_tile(tmp_path):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    encoded = _count_encoded(teacher)
    volume = torch.zeros(1, 32, 48, 32)  # in-plane tiles at y = 0, 16; slices along z (the slice axis)
    volume[0, 4:28, 8:40, 10] = torch.linspace(0, 1, 24 * 32).view(24, 32)
    volume[0, 2:30, 2:46, 20] = 1.0
    _warm(teacher, {"ct": volume}, (32, 32, 16))
    assert encoded[0] == 5  # 2 tiles x 2 slices with content, and the blank slice crop once
    crop = RandGridCropd("image", (32, 32, 16), tiles=True)
    crop.set_random_state(1)
    for _ in range(20):
        patch = crop({"image": volume})["image"]
        assert all(image_key(s) in teacher.cache for s in teacher.to_slices(patch[None]))


def test_3d_warm_up_of_whole_slices_serves_every_patch_stage_2_draws(tmp_path):
    """With whole slices each distinct slice is encoded once, whatever its tiles, and a stage 2 step on
    any patch of the volume (its whole slices as context) finds all of them in the cache."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    encoded = _count_encoded(teacher)
    volume = torch.zeros(1, 32, 48, 32)  # 2 in-plane tiles, 3 distinct slices (2 with content, blank)
    volume[0, 4:28, 8:40, 10] = torch.linspace(0, 1, 24 * 32).view(24, 32)
    volume[0, 2:30, 2:46, 20] = 1.0
    warm = _warm(teacher, {"ct": volume}, (32, 32, 16), whole_slices=True)
    assert encoded[0] == 3 and warm.summary["slice_crops"] == 3  # tile crops would be 5
    crop = RandGridCropd("image", (32, 32, 16), tiles=True, context_key="image_context")
    crop.set_random_state(1)
    step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), torch.nn.Conv3d(1, 3, 1), teacher)
    misses, hits = teacher.cache.misses, teacher.cache.hits
    for _ in range(4):
        out = crop({"image": volume})
        step.teacher_probs(out["image"][None], [out["image_context"]], out["image_context_start"][None])
    assert encoded[0] == 3 and teacher.cache.misses == misses and teacher.cache.hits > hits


def test_nothing_to_warm_without_a_generalized_teacher_or_cache_or_when_disabled(tmp_path):
    images = {"a": torch.randn(1, 32, 32)}
    assert _warm(None, images, (32, 32)).summary == {}  # teachers: specialized
    uncached = GeneralizedTeacher()
    encoded = _count_encoded(uncached)
    assert _warm(uncached, images, (32, 32)).summary == {} and encoded[0] == 0
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    assert _warm(teacher, images, (32, 32), enabled=False).summary == {} and len(teacher.cache) == 0


def test_an_image_of_other_dims_than_roi_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"spatial shape \[32, 32\] for roi_size \[32, 32, 16\]"):
        _warm(GeneralizedTeacher(cache_dir=tmp_path), {"a": torch.randn(1, 32, 32)}, (32, 32, 16))
