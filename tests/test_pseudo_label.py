import math

import pytest
import torch

from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss, fuse_by_owner, shannon_entropy


def _probs(*columns):
    """(1, C, 1, N) probability map from per-voxel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[None, :, None, :]


def test_entropy_values():
    p = _probs([1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0])
    assert shannon_entropy(p).flatten().tolist() == pytest.approx([math.log(3), 0.0, math.log(2)], abs=1e-6)


def test_gate_picks_the_lower_entropy_teacher_voxel_by_voxel():
    spec = _probs([0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.1, 0.8, 0.1], [0.34, 0.33, 0.33])
    gen = _probs([0.2, 0.2, 0.6], [0.02, 0.02, 0.96], [0.3, 0.4, 0.3], [0.2, 0.6, 0.2])
    result = EntropyGate("both", "none")(spec, gen, threshold=0.0)
    assert result.from_generalized.flatten().tolist() == [False, True, False, True]
    assert result.pseudo_label.flatten().tolist() == [0, 2, 1, 1]
    assert result.mask.flatten().tolist() == [1, 1, 1, 1]  # gate off: everything supervised
    expected = torch.minimum(shannon_entropy(spec), shannon_entropy(gen))
    assert torch.allclose(result.entropy, expected)


def test_gate_masks_exactly_the_voxels_above_the_threshold():
    spec = _probs([0.98, 0.01, 0.01], [0.6, 0.2, 0.2], [0.34, 0.33, 0.33], [0.01, 0.98, 0.01])
    threshold = 0.5
    result = EntropyGate("specialized", "entropy")(spec, None, threshold)
    entropy = shannon_entropy(spec).flatten()
    assert result.mask.flatten().tolist() == [float(e < threshold) for e in entropy.tolist()] == [1, 0, 0, 1]
    stats = result.stats()
    assert stats == {"gate_kept": 0.5, "gate_from_generalized": 0.0, "gate_from_specialized": 1.0}


def test_generalized_only_and_abstention_prefers_the_other_teacher():
    spec = _probs([0.7, 0.2, 0.1], [0.7, 0.2, 0.1])
    uniform = _probs([1 / 3] * 3, [0.0, 0.0, 1.0])  # first voxel: the generalized teacher abstained
    both = EntropyGate("both")(spec, uniform, threshold=10.0)
    assert both.from_generalized.flatten().tolist() == [False, True]
    only = EntropyGate("generalized")(None, uniform, threshold=10.0)
    assert only.from_generalized.all() and only.pseudo_label.flatten().tolist()[1] == 2
    with pytest.raises(ValueError, match="teachers"):
        EntropyGate("three")


def test_by_class_takes_each_foreground_class_from_its_owner_and_the_background_from_what_is_left():
    """Four classes, the generalized teacher owns class 2 only: classes 1 and 3 are the EMA teacher's,
    the background is one minus the owners' foreground (renormalised where it passes one)."""
    spec = _probs([0.1, 0.8, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.0, 0.3])
    gen = _probs([0.1, 0.0, 0.9, 0.0], [0.1, 0.3, 0.5, 0.1], [0.9, 0.0, 0.1, 0.0])
    owners = torch.tensor([False, True, False])
    fused, from_gen = fuse_by_owner(spec, gen, owners)
    # voxel 0: organ 0.8 + 0.9 from the owner of class 2 + 0.05 > 1: renormalised, no background
    assert fused[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.8 / 1.75, 0.9 / 1.75, 0.05 / 1.75])
    assert fused[0, :, 0, 1].tolist() == pytest.approx([0.3, 0.1, 0.5, 0.1])
    assert fused[0, :, 0, 2].tolist() == pytest.approx([0.0, 0.6 / 1.0, 0.1, 0.3])
    assert torch.allclose(fused.sum(1), torch.ones(1, 1, 3))
    assert from_gen.flatten().tolist() == [True, True, False]  # argmax 2, 2, 1
    result = EntropyGate("by_class", "none")(spec, gen, threshold=0.0, owners=owners)
    assert result.pseudo_label.flatten().tolist() == [2, 2, 1]
    assert torch.allclose(result.entropy, shannon_entropy(fused))
    assert result.stats()["gate_from_generalized"] == pytest.approx(2 / 3)
    # owning every class gives the generalized teacher's map back, owning none the EMA teacher's
    assert torch.allclose(fuse_by_owner(spec, gen, torch.ones(3, dtype=torch.bool))[0], gen)
    assert torch.allclose(fuse_by_owner(spec, gen, torch.zeros(3, dtype=torch.bool))[0], spec)
    with pytest.raises(ValueError, match="owner"):
        EntropyGate("by_class")(spec, gen, threshold=1.0)
    with pytest.raises(ValueError, match="one teacher per foreground class"):
        fuse_by_owner(spec, gen, torch.tensor([True, False]))


def test_soft_gate_weights_every_voxel_by_one_minus_its_normalised_entropy():
    """4 classes: a certain voxel weighs 1, a uniform one 0, the rest in between; nothing is cut."""
    spec = _probs([1.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4])
    result = EntropyGate("specialized", "soft")(spec, None, threshold=0.0)  # the threshold is not read
    expected = 1.0 - shannon_entropy(spec) / math.log(4)
    assert torch.allclose(result.mask, expected.clamp(0, 1), atol=1e-6)
    assert result.mask.flatten()[0] == pytest.approx(1.0) and result.mask.flatten()[1] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < float(result.mask.flatten()[2]) < 1.0 and result.pseudo_label.flatten()[3] in (2, 3)
    assert result.stats()["gate_kept"] == pytest.approx(float(expected.mean()), abs=1e-6)  # the mean weight
    volume = spec.reshape(1, 4, 1, 2, 2)  # the same voxels as a (1, 4, 1, 2, 2) volume: the same weights
    assert torch.equal(EntropyGate("specialized", "soft")(volume, None, 0.0).mask.flatten(), result.mask.flatten())


def test_pseudo_loss_only_sees_gated_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 1, 8, 8))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    loss_fn = PseudoLabelLoss()
    loss = loss_fn(logits, pseudo, mask)
    loss.backward()
    assert logits.grad[:, :, 4:].abs().max() == 0 and logits.grad[:, :, :4].abs().max() > 0
    other = pseudo.clone()
    other[:, :, 4:] = (other[:, :, 4:] + 1) % 3  # labels under the mask do not matter
    assert torch.allclose(loss_fn(logits, other, mask), loss)
    assert loss_fn(logits, pseudo, torch.zeros_like(mask)).item() == 0.0


def test_quantile_gate_keeps_each_pseudo_class_its_most_certain_share():
    """With the kept fraction as threshold every pseudo-class keeps its own lowest-entropy voxels,
    however confident the teachers are overall (an entropy threshold near ln C keeps them all)."""
    certain = [[0.99, 0.005, 0.005], [0.98, 0.01, 0.01], [0.97, 0.02, 0.01], [0.96, 0.02, 0.02]]
    lesion = [[0.01, 0.01, 0.98], [0.3, 0.1, 0.6]]
    spec = _probs(*certain, *lesion)
    result = EntropyGate("specialized", "quantile")(spec, None, threshold=0.5)
    assert result.mask.flatten().tolist() == [1, 1, 0, 0, 1, 0]
    assert EntropyGate("specialized", "entropy")(spec, None, threshold=math.log(3)).mask.all()
    assert EntropyGate("specialized", "quantile")(spec, None, threshold=1.0).mask.all()
    with pytest.raises(ValueError, match="fraction"):
        EntropyGate("specialized", "quantile")(spec, None, threshold=0.0)


def test_disagreement_mask_drops_the_voxels_where_the_teachers_differ():
    spec = _probs([0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1])
    gen = _probs([0.8, 0.1, 0.1], [0.05, 0.05, 0.9], [0.7, 0.2, 0.1])
    decide = EntropyGate("both", "none", disagreement="entropy")(spec, gen, threshold=0.0)
    masked = EntropyGate("both", "none", disagreement="mask")(spec, gen, threshold=0.0)
    assert decide.mask.flatten().tolist() == [1, 1, 1]
    assert masked.mask.flatten().tolist() == [1, 0, 1]
    assert torch.equal(decide.pseudo_label, masked.pseudo_label)
    with pytest.raises(ValueError, match="disagreement"):
        EntropyGate("both", disagreement="vote")


def test_class_guard_abstains_where_the_prior_expects_a_class_the_pseudo_label_lacks():
    from custom.losses.pseudo_label import expected_class_guard

    # class 2 is never the argmax, but its probability is highest at voxels 1 and 3
    spec = _probs([0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05])
    pseudo = spec.argmax(1, keepdim=True)
    prior = torch.tensor([0.6, 0.0, 0.4])  # ceil(0.4 * 5) = 2 voxels of class 2 expected; class 1 has none
    assert expected_class_guard(spec, pseudo, prior).flatten().tolist() == [1, 0, 1, 0, 1]
    # where the expected region is already labelled as the class, nothing is taken out
    spec2 = _probs([0.1, 0.1, 0.8], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05])
    allowed = expected_class_guard(spec2, spec2.argmax(1, keepdim=True), torch.tensor([0.75, 0.0, 0.25]))
    assert allowed.flatten().tolist() == [1, 1, 1, 1]

    gate = EntropyGate("specialized", "none", guard="prior")
    result = gate(spec, None, threshold=0.0, class_prior=prior)
    assert result.mask.flatten().tolist() == [1, 0, 1, 0, 1]
    assert result.guarded.flatten().tolist() == [False, True, False, True, False]
    assert result.stats()["gate_guarded"] == pytest.approx(0.4)
    assert "gate_guarded" not in EntropyGate("specialized", "none")(spec, None, 0.0).stats()
    with pytest.raises(ValueError, match="class_prior"):
        gate(spec, None, threshold=0.0)
    with pytest.raises(ValueError, match="guard"):
        EntropyGate("both", guard="atlas")


def _organ_with_lesion() -> torch.Tensor:
    """(1, 1, 12, 12) label: an organ (1) holding a lesion (2), and a separate class 3 on background."""
    label = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    label[..., 1:8, 1:8] = 1
    label[..., 3:5, 3:6] = 2
    label[..., 9:11, 8:11] = 3
    return label


def test_a_class_inside_another_is_found_from_its_border():
    from custom.losses.pseudo_label import border_class_counts, nested_parents

    counts = border_class_counts(_organ_with_lesion(), 4)
    assert counts[2].tolist() == [0, 14, 0, 0]  # the 2 x 3 lesion's 4 x 5 box less itself: all organ
    assert nested_parents(counts) == [None, None, 1, None]  # organ and class 3 border background
    volume = _organ_with_lesion()[:, :, None].expand(1, 1, 3, 12, 12)  # the same in 3D
    assert nested_parents(border_class_counts(volume, 4)) == [None, None, 1, None]
    touching = torch.zeros(1, 1, 4, 6, dtype=torch.long)
    touching[..., :, :3], touching[..., :, 3:] = 1, 2  # two classes filling the image, each along the other
    assert nested_parents(border_class_counts(touching, 3)) == [None, None, None]


def test_nested_loss_is_the_plain_loss_without_nesting_and_forgives_a_missed_inner_class():
    from custom.losses.pseudo_label import nesting_matrix

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    pseudo = torch.randint(0, 4, (2, 1, 6, 6))
    mask = (torch.rand(2, 1, 6, 6) > 0.3).float()
    plain = PseudoLabelLoss()(logits, pseudo, mask)
    nested = PseudoLabelLoss(nesting="labelled")
    assert nested._nested(logits, pseudo, mask, torch.eye(4)) == pytest.approx(float(plain), rel=1e-5)
    assert nested(logits, pseudo, mask, parents=[None] * 4) == pytest.approx(float(plain), rel=1e-6)
    assert nesting_matrix([None, None, 1, 2]).tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]

    # every voxel pseudo-labelled organ (1); the student says lesion (2, inside the organ) on half
    organ = torch.ones(1, 1, 2, 4, dtype=torch.long)
    says = torch.full((1, 3, 2, 4), -8.0)
    says[:, 1, 0], says[:, 2, 1] = 8.0, 8.0
    ones = torch.ones(1, 1, 2, 4)
    assert PseudoLabelLoss(nesting="labelled")(says, organ, ones, parents=[None, None, 1]) < 1e-4
    assert PseudoLabelLoss()(says, organ, ones) > 1.0  # the plain loss teaches "not lesion" there
    # the other way round is not forgiven: pseudo-lesion where the student says organ
    lesion = torch.full_like(organ, 2)
    assert PseudoLabelLoss(nesting="labelled")(says, lesion, ones, parents=[None, None, 1]) > 1.0
    with pytest.raises(ValueError, match="nesting"):
        PseudoLabelLoss(nesting="atlas")
