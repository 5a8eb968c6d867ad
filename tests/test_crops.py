"""Training patches on the token grid: one shape per batch from images of any size, exact targets."""

from __future__ import annotations

import pytest
import torch

from custom.data.crops import RandGridCropd


def _sample(shape: tuple[int, ...]) -> dict:
    """Image whose voxels hold their flat index, and a token-grid map whose cells hold the flat index
    of the voxel at their corner, so a crop's alignment can be read off the values."""
    image = torch.arange(torch.tensor(shape).prod().item(), dtype=torch.float64).reshape(1, *shape)
    corners = image[(slice(None), *(slice(None, None, 16) for _ in shape))]
    return {"image": image, "label": torch.zeros(1, *shape), "teacher_enc1": corners.clone()}


@pytest.mark.parametrize("shape, roi", [((176, 208), (128, 128)), ((64, 48, 32), (32, 32, 16))])
def test_crop_has_the_roi_shape_and_cuts_token_maps_by_the_same_box(shape, roi):
    crop = RandGridCropd(["image", "label"], roi, grid_keys=["teacher_enc1"], label_key="label")
    crop.set_random_state(0)
    starts = set()
    for _ in range(20):
        out = crop(_sample(shape))
        assert tuple(out["image"].shape[1:]) == roi and tuple(out["label"].shape[1:]) == roi
        assert tuple(out["teacher_enc1"].shape[1:]) == tuple(r // 16 for r in roi)
        corners = out["image"][(slice(None), *(slice(None, None, 16) for _ in roi))]
        assert torch.equal(out["teacher_enc1"], corners)  # every target cell still sits on its voxels
        assert all(s % 16 == 0 for s in crop.last_start)
        starts.add(crop.last_start)
    assert len(starts) > 1


def test_class_balanced_crops_find_a_small_structure():
    label = torch.zeros(1, 256, 256)
    label[0, 20:200, 20:200] = 1  # a large class
    label[0, 230:236, 240:246] = 2  # a small one in a corner
    sample = {"image": torch.zeros(1, 256, 256), "label": label}
    balanced = RandGridCropd(["image", "label"], (64, 64), label_key="label", pos=1.0, neg=0.0)
    anywhere = RandGridCropd(["image", "label"], (64, 64))
    balanced.set_random_state(1)
    anywhere.set_random_state(1)
    hits = [int((balanced(sample)["label"] == 2).any()) for _ in range(200)]
    blind = [int((anywhere(sample)["label"] == 2).any()) for _ in range(200)]
    assert 0.35 < sum(hits) / 200 < 0.65  # half the crops are centred on the small class
    assert sum(blind) / 200 < 0.15


def test_tiles_cover_the_image_with_few_distinct_crops():
    crop = RandGridCropd("image", (128, 128), tiles=True)
    crop.set_random_state(0)
    starts = set()
    for _ in range(100):
        crop({"image": torch.zeros(1, 176, 208)})
        starts.add(crop.last_start)
    assert starts == {(0, 0), (0, 80), (48, 0), (48, 80)}


def test_sample_of_the_roi_size_passes_unchanged_and_a_smaller_one_is_refused():
    crop = RandGridCropd("image", (32, 32))
    image = torch.zeros(1, 32, 32)
    assert crop({"image": image})["image"] is image
    with pytest.raises(ValueError, match=r"spatial shape \[16, 48\] cannot be cut to roi_size \[32, 32\]"):
        crop({"image": torch.zeros(1, 16, 48)})
    with pytest.raises(ValueError, match=r"roi_size \[40, 32\] must be positive multiples of 16"):
        RandGridCropd("image", (40, 32))


def test_context_is_the_patch_s_whole_slices_and_the_start_places_the_patch_in_it():
    from custom.data.crops import ContextCollate

    torch.manual_seed(0)
    volume = torch.randn(1, 80, 48, 48)
    crop = RandGridCropd("image", (32, 32, 16), tiles=True, context_key="image_context", context_axis=2)
    crop.set_random_state(3)
    samples = [crop({"image": volume}) for _ in range(6)]
    for out in samples:
        context, start = out["image_context"], out["image_context_start"]
        x, y, z = start.tolist()
        assert context.shape == (1, 80, 48, 16), "whole slices, cut along the slice axis like the patch"
        assert torch.equal(context, volume[..., z : z + 16])
        assert torch.equal(context[:, x : x + 32, y : y + 32], out["image"])
    assert len({tuple(s["image_context_start"].tolist()) for s in samples}) > 1
    # 2D: the context is the whole image; a sample of the roi's size is its own context, starting at 0
    image = torch.randn(1, 48, 64)
    flat = RandGridCropd("image", (32, 32), context_key="image_context")({"image": image})
    assert torch.equal(flat["image_context"], image)
    whole = RandGridCropd("image", (48, 64), context_key="image_context")({"image": image})
    assert whole["image_context_start"].tolist() == [0, 0] and torch.equal(whole["image_context"], image)
    # contexts of different sizes batch as a list, the rest as usual
    other = RandGridCropd("image", (32, 32), context_key="image_context")({"image": torch.randn(1, 32, 48)})
    batch = ContextCollate("image_context")([flat, other])
    assert batch["image"].shape == (2, 1, 32, 32) and batch["image_context_start"].shape == (2, 2)
    assert [tuple(c.shape) for c in batch["image_context"]] == [(1, 48, 64), (1, 32, 48)]
