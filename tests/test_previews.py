"""Inference previews: PNGs of the segmentation over the input, with the entropy map when asked."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from conftest import CONFIGS, TINY_NET, save_student
from monai.bundle import run
from PIL import Image

from custom.handlers.previews import CLASS_COLOURS, SegmentationPreview, class_colours


def test_inference_writes_previews_with_entropy_in_the_input_space(tmp_path):
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(0)
    student = UnCoLStudent(spatial_dims=2, **{k.split("#")[1]: v for k, v in TINY_NET.items()})
    save_student(student, tmp_path / "model.pt")
    src = tmp_path / "in"
    src.mkdir()
    affine = np.diag([-0.8, 0.8, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(37, 45)).astype(np.float32), affine),
             src / "case_a.nii.gz")  # fmt: skip
    out = tmp_path / "out"
    common = dict(ckpt_path=str(tmp_path / "model.pt"), input_dir=str(src), roi_size=[32, 32], **TINY_NET)
    run("inference", config_file=str(CONFIGS / "inference.json"), output_dir=str(out), previews=True,
        preview_entropy=True, **common)  # fmt: skip
    with_entropy = Image.open(out / "previews" / "case_a_preview.png")
    assert (out / "case_a_seg.nii.gz").is_file()  # the segmentation is still written
    run("inference", config_file=str(CONFIGS / "inference.json"), output_dir=str(tmp_path / "plain"),
        previews=True, **common)  # fmt: skip
    plain = Image.open(tmp_path / "plain" / "previews" / "case_a_preview.png")
    assert with_entropy.width > 1.6 * plain.width and with_entropy.height == plain.height  # two panels vs one
    run("inference", config_file=str(CONFIGS / "inference.json"), output_dir=str(tmp_path / "none"), **common)
    assert not (tmp_path / "none" / "previews").exists()  # off by default


def test_preview_of_a_volume_shows_the_chosen_slice(tmp_path):
    image = torch.zeros(1, 20, 24, 10)
    image[0, :, :, 7] = 1.0  # only slice 7 is bright
    pred = torch.zeros(1, 20, 24, 10)
    pred[0, 5:10, 5:10, 7] = 2
    middle = SegmentationPreview(tmp_path / "m").write({"image": image, "pred": pred})
    chosen = SegmentationPreview(tmp_path / "c", slice_index=7).write({"image": image, "pred": pred})
    assert middle.name == chosen.name == "case_preview.png"
    # the middle slice (5) is blank; slice 7 shows the bright plane with a red (lesion) overlay
    m, c = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (middle, chosen))
    assert c.mean() > m.mean()

    def reddish(x):
        return (x[..., 0] - x[..., 1] > 60) & (x[..., 0] - x[..., 2] > 60)

    assert reddish(c).any() and not reddish(m).any()


def test_every_class_gets_its_own_colour_for_any_number_of_classes():
    colours = class_colours(12)
    assert colours[:4] == CLASS_COLOURS and len(colours) == 12
    assert len({tuple(round(c, 3) for c in colour) for colour in colours}) == 12
    assert class_colours(2) == CLASS_COLOURS[:2]
