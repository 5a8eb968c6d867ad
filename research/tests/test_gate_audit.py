"""The gate audit's per-class scores and its table (research/bench/gate_audit.py)."""

import json

import torch

from research.bench.gate_audit import ROOT, class_recall, table


def test_class_recall_counts_each_class_found_and_kept_as_another():
    truth = torch.tensor([[0, 1, 1, 2, 2, 2]])
    spec = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0, 1, 1, 0]]), 3).permute(0, 2, 1).float()
    gen = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2, 0, 0]]), 3).permute(0, 2, 1).float()
    pseudo = torch.tensor([[0, 1, 1, 1, 0, 2]])
    kept = torch.tensor([[True, True, False, True, True, False]])
    one, two = class_recall(spec, gen, pseudo, kept, truth)
    assert one == {
        "class": 1,
        "voxels": 2,
        "ema": 0.5,
        "litemedsam": 1.0,
        "kept_pseudo_label": 0.5,
        "kept_as_other": 0.0,
        "kept_as_background": 0.0,
    }
    # class 2: the EMA teacher never calls it, two of its three voxels are kept as class 1 or background
    assert two["ema"] == 0.0 and two["litemedsam"] == round(1 / 3, 4)
    assert two["kept_pseudo_label"] == 0.0 and two["kept_as_other"] == round(2 / 3, 4)
    assert two["kept_as_background"] == round(1 / 3, 4)  # the other third is kept as class 1


def test_class_recall_counts_a_soft_gates_voxel_by_its_weight():
    truth = torch.tensor([[1, 1, 2, 2]])
    spec = torch.nn.functional.one_hot(torch.tensor([[1, 1, 2, 2]]), 3).permute(0, 2, 1).float()
    pseudo = torch.tensor([[1, 2, 2, 0]])
    weight = torch.tensor([[1.0, 0.5, 0.25, 0.0]])
    one, two = class_recall(spec, spec, pseudo, weight, truth)
    assert one["kept_pseudo_label"] == 0.5 and one["kept_as_other"] == 0.25  # (1 + 0) / 2, 0.5 / 2
    assert two["kept_pseudo_label"] == 0.125 and two["kept_as_background"] == 0.0  # 0.25 / 2; weight 0
    hard = class_recall(spec, spec, pseudo, weight > 0, truth)  # a mask is weights of 0 and 1
    assert hard[0]["kept_as_other"] == 0.5 and hard[1]["kept_pseudo_label"] == 0.5


def test_committed_audit_rebuilds_with_n_a_where_a_score_was_not_recorded():
    payload = json.loads((ROOT / "research" / "results" / "gate_audit_colin27.json").read_text())
    for snapshot in ("start", "end"):  # the first variant as an audit from before per-class scores existed
        payload["variants"][0]["result"][snapshot].pop("class_recall", None)
    rows = table(payload).splitlines()
    assert len(rows) >= 2 + len(payload["variants"])
    assert all(row.count("|") == rows[0].count("|") for row in rows[: 2 + len(payload["variants"])])
    header = [c.strip() for c in rows[0].split("|")]
    column = header.index("each class kept as another % (end)")
    assert rows[2].split("|")[column].strip() == "n/a"
    assert rows[3].split("|")[column].strip() != "n/a"  # the committed audit records them


def test_patches_are_distinct_tiles_with_their_labels_and_whole_slices():
    from research.bench.gate_audit import cut_patches

    images = torch.arange(2 * 48 * 32 * 32, dtype=torch.float32).reshape(2, 1, 48, 32, 32)
    labels = (images > images.mean()).long()
    patches, patch_labels, contexts, starts = cut_patches(images, labels, [32, 16, 16], 3, slice_axis=2, seed=0)
    assert patches.shape == (6, 1, 32, 16, 16) and patch_labels.shape == patches.shape and starts.shape == (6, 3)
    for k in range(6):
        image, label, (x, y, z) = images[k // 3], labels[k // 3], starts[k].tolist()
        assert torch.equal(patches[k], image[:, x : x + 32, y : y + 16, z : z + 16])
        assert torch.equal(patch_labels[k], label[:, x : x + 32, y : y + 16, z : z + 16])
        # the context is the patch's slices whole: cut along the slice axis only
        assert torch.equal(contexts[k], image[:, :, :, z : z + 16])
    for first in (0, 3):  # no tile twice from one image
        assert len({tuple(s.tolist()) for s in starts[first : first + 3]}) == 3
