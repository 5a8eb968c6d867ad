"""Uncertainty-aware pseudo-labelling of UnCoL stage 2.

For every unlabelled voxel the Shannon entropy of each teacher's class probabilities is computed;
the more certain teacher (lower entropy) supplies the pseudo-label, and only the most certain voxels
are supervised. The gate's cut is one of two schedules (:mod:`custom.handlers.ramps`): with
``gate="entropy"`` (UA-MT's rule) the ``entropy_threshold``, in nats, under which a voxel is kept; with
``gate="quantile"`` the ``keep_fraction`` of each pseudo-class's voxels kept, those of lowest entropy
in the batch (self-adaptive: informative for any number of classes and however confident the
teachers are); with ``gate="soft"`` no voxel is cut: each is weighted by its reliability, one minus
its entropy over ``ln C`` (UPCoL's soft weighting), so an uncertain voxel counts for less instead of
nothing. Where the teachers disagree on the class, ``disagreement="mask"`` drops the voxel
instead of letting the lower entropy decide.

``guard="prior"`` keeps a class the teachers miss from being unlearned: when neither teacher labels a
class on the unlabelled images, every kept voxel there says "another class", and the student
unlearns it (seen on a real-anatomy task: the project's research record, research/results.md). With
the labelled data's class fractions as a prior, the voxels where the EMA teacher's probability of
class ``c`` is highest (as many as the prior expects of ``c`` in the batch) are not supervised as
another class: where a class is expected, the pseudo-labels abstain unless they say that class.

``PseudoLabelLoss(nesting="labelled")`` reads a pseudo-label of a class that others lie inside as "this
class or one inside it". A lesion inside an organ that both teachers miss is pseudo-labelled organ
(the embedded 2D audit keeps most of the true lesion as another class; the phantoms' lesions lie inside
the organ); a plain loss then teaches the student that the lesion is organ. Which class lies inside
which is read off the labelled batches (:func:`nested_parents`: most of a class's outer border is the
other class), so the switch does nothing where no class is nested (side-by-side structures).

``teachers="by_class"`` trusts each teacher for the classes it segments better instead of voxel by voxel:
every foreground class is taught by its *owner* (the call's ``owners``, from each teacher's Dice on the
validation split, :class:`~custom.handlers.reliability.TeacherReliability`). The two teachers' maps
are fused class by class (:func:`fuse_by_owner`) and the gate cuts the fused map. The per-voxel entropy
rule takes about nine pseudo-labels in ten from LiteMedSAM on the embedded phantoms, although the EMA
teacher segments their organ better (research/results.md has what the switch did there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss

TEACHER_MODES = ("both", "specialized", "generalized", "by_class")
GATE_MODES = ("entropy", "quantile", "soft", "none")
DISAGREEMENT_MODES = ("entropy", "mask")
GUARD_MODES = ("none", "prior")
NESTING_MODES = ("none", "labelled")


def border_class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` counts: row ``c``, column ``k``: voxels of class ``k`` that touch class ``c`` from
    outside (its one-voxel outer border, faces and corners). ``labels``: ``(B, 1, *S)`` class indices."""
    onehot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()
    pool = F.max_pool3d if onehot.ndim == 5 else F.max_pool2d
    border = pool(onehot, kernel_size=3, stride=1, padding=1) * (1.0 - onehot)
    return torch.einsum("bc...,bk...->ck", border, onehot)


def nested_parents(border_counts: torch.Tensor, share: float = 0.5) -> list[int | None]:
    """Per class, the foreground class it lies inside, else None: ``c`` lies inside ``p`` when more than
    ``share`` of its outer border (:func:`border_class_counts`) is ``p``. Background has no parent; two
    classes that each lie mostly along the other (touching neighbours) are not nested."""
    counts = border_counts.double()
    parents: list[int | None] = [None] * len(counts)
    for c in range(1, len(counts)):
        total = counts[c].sum()
        if total <= 0:
            continue
        p = int(counts[c].argmax())
        if p not in (0, c) and counts[c, p] / total > share:
            parents[c] = p
    for c, p in enumerate(parents):
        if p is not None and parents[p] == c:
            parents[c] = parents[p] = None
    return parents


def nesting_matrix(parents: list[int | None]) -> torch.Tensor:
    """``(C, C)``: entry ``[j, k]`` is 1 where ``k == j`` or ``k`` lies (transitively) inside ``j``."""
    matrix = torch.eye(len(parents))
    for k in range(len(parents)):
        j, seen = parents[k], {k}
        while j is not None and j not in seen:
            matrix[j, k] = 1.0
            seen.add(j)
            j = parents[j]
    return matrix


def expected_class_guard(
    specialized: torch.Tensor, pseudo_label: torch.Tensor, class_prior: torch.Tensor
) -> torch.Tensor:
    """0 where a foreground class is expected but the pseudo-label is another class, else 1.

    ``specialized``: ``(B, C, *S)`` the EMA teacher's class probabilities; ``pseudo_label``: ``(B, 1, *S)``;
    ``class_prior``: ``(C,)`` each class's share of the labelled voxels. For every foreground class ``c``
    with a prior ``f_c > 0``, its expected region is the ``ceil(f_c * N)`` voxels of the batch (``N``
    voxels) with the highest probability of ``c``; its voxels whose pseudo-label is not ``c`` are guarded."""
    allowed = torch.ones_like(pseudo_label, dtype=specialized.dtype)
    total = pseudo_label.numel()
    for c in range(1, specialized.shape[1]):
        share = float(class_prior[c])
        if share <= 0.0:
            continue
        k = min(total, math.ceil(round(share * total, 6)))  # 0.4 * 5 is 2, not 3
        probs = specialized[:, c : c + 1]
        cutoff = probs.flatten().topk(k).values[-1]
        allowed[(probs >= cutoff) & (pseudo_label != c)] = 0.0
    return allowed


def classwise_quantile_mask(entropy: torch.Tensor, pseudo_label: torch.Tensor, keep: float) -> torch.Tensor:
    """1 on the ``keep`` fraction (rounded up) of each class's voxels with the lowest entropy, else 0.

    ``entropy`` and ``pseudo_label`` are ``(B, 1, *S)``; classes are the pseudo-label's, counted over the
    whole batch. Voxels tied with a class's cut-off entropy are all kept."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"a quantile gate keeps a fraction in (0, 1], got {keep}")
    mask = torch.zeros_like(entropy)
    for c in torch.unique(pseudo_label):
        members = pseudo_label == c
        values = entropy[members]
        k = max(1, math.ceil(keep * values.numel()))
        cutoff = values.kthvalue(k).values
        mask[members & (entropy <= cutoff)] = 1.0
    return mask


def shannon_entropy(probs: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``-sum p log p`` over ``dim`` (natural log: at most ``ln(C)``), keeping ``dim`` as size 1."""
    return -(probs * torch.log(probs.clamp_min(eps))).sum(dim, keepdim=True)


def fuse_by_owner(
    specialized: torch.Tensor, generalized: torch.Tensor, owners: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(B, C, *S)`` with each foreground class ``c`` from its owner's map (``owners``:
    ``(C - 1,)`` bool, True where the generalized teacher owns ``c``) and the background what the
    foreground leaves (renormalised where the owners' foregrounds sum past one); and ``(B, 1, *S)`` bool,
    where the fused map's class is owned by the generalized teacher (background: where it owns every
    class)."""
    if owners.shape != (specialized.shape[1] - 1,):
        raise ValueError(
            f"owners must name one teacher per foreground class ({specialized.shape[1] - 1}), got {tuple(owners.shape)}"
        )
    shape = (1, -1) + (1,) * (specialized.ndim - 2)
    take_gen = owners.to(specialized.device).view(shape)
    foreground = torch.where(take_gen, generalized[:, 1:], specialized[:, 1:])
    total = foreground.sum(1, keepdim=True)
    fused = torch.cat([(1.0 - total).clamp_min(0.0), foreground], 1) / total.clamp_min(1.0)
    owner = torch.cat([owners.all().view(1), owners]).to(specialized.device)
    return fused, owner[fused.argmax(1, keepdim=True)]


@dataclass
class GateResult:
    pseudo_label: torch.Tensor  # (B, 1, *S) class indices
    mask: torch.Tensor  # (B, 1, *S) float, 1 where supervised (a weight in [0, 1] with the soft gate)
    from_generalized: torch.Tensor  # (B, 1, *S) bool, where the generalized teacher supplied the label
    entropy: torch.Tensor  # (B, 1, *S) entropy of the chosen teacher
    guarded: torch.Tensor | None = None  # (B, 1, *S) bool, voxels the class guard took out (None: no guard)

    def stats(self) -> dict[str, float]:
        """Fraction of voxels kept, of the kept voxels the fraction each teacher supplied, and (with the
        class guard) the fraction of voxels it took out."""
        kept = self.mask.sum()
        from_gen = (self.from_generalized.float() * self.mask).sum()
        frac_gen = float(from_gen / kept) if kept > 0 else 0.0
        stats = {
            "gate_kept": float(self.mask.mean()),
            "gate_from_generalized": frac_gen,
            "gate_from_specialized": (1.0 - frac_gen) if kept > 0 else 0.0,
        }
        if self.guarded is not None:
            stats["gate_guarded"] = float(self.guarded.float().mean())
        return stats


class EntropyGate:
    """Pick each voxel's pseudo-label from the lower-entropy teacher and mask uncertain voxels.

    Args:
        teachers: ``both`` (UnCoL), ``specialized`` (Mean Teacher with the same gate), ``generalized`` or
            ``by_class`` (each foreground class from the teacher that owns it, the call's ``owners``; see
            the module docstring).
        gate: ``entropy`` (keep voxels whose chosen entropy is under the call's ``threshold``, an entropy),
            ``quantile`` (the call's ``threshold`` is the fraction of each pseudo-class's voxels kept, those
            of lowest entropy), ``soft`` (keep all, weighted by ``1 - entropy / ln C``; no threshold) or
            ``none`` (keep all).
        disagreement: with both teachers, where their classes differ: ``entropy`` (the lower entropy
            decides, then the gate) or ``mask`` (not supervised).
        guard: ``prior``: where the EMA teacher's probability of a class is among the highest that the
            labelled class prior (``class_prior`` of the call) expects, only that class is supervised
            (:func:`expected_class_guard`); ``none``: off.
    """

    def __init__(
        self, teachers: str = "both", gate: str = "entropy", disagreement: str = "entropy", guard: str = "none"
    ) -> None:
        if teachers not in TEACHER_MODES:
            raise ValueError(f"teachers must be one of {TEACHER_MODES}, got {teachers!r}")
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
        if disagreement not in DISAGREEMENT_MODES:
            raise ValueError(f"disagreement must be one of {DISAGREEMENT_MODES}, got {disagreement!r}")
        if guard not in GUARD_MODES:
            raise ValueError(f"guard must be one of {GUARD_MODES}, got {guard!r}")
        self.teachers = teachers
        self.gate = gate
        self.disagreement = disagreement
        self.guard = guard

    def __call__(
        self,
        specialized: torch.Tensor | None,
        generalized: torch.Tensor | None,
        threshold: float,
        class_prior: torch.Tensor | None = None,
        prior_probs: torch.Tensor | None = None,
        owners: torch.Tensor | None = None,
    ) -> GateResult:
        """``(B, C, *S)`` class probabilities of each teacher (None for an unused one). The class guard
        needs ``class_prior`` (``(C,)``) and reads ``prior_probs`` (default: ``specialized``), the EMA
        teacher's probabilities, which exist even when only the generalized teacher labels;
        ``teachers="by_class"`` needs ``owners`` (:func:`fuse_by_owner`)."""
        if self.teachers == "by_class":  # one fused map: the teachers' own entropies are not needed
            if owners is None:
                raise ValueError(
                    "teachers='by_class' needs each class's owner (custom.handlers.reliability.TeacherReliability)"
                )
            probs, use_gen = fuse_by_owner(specialized, generalized, owners)
            entropy = shannon_entropy(probs)
        else:
            ent_s = shannon_entropy(specialized) if specialized is not None else None
            ent_g = shannon_entropy(generalized) if generalized is not None else None
        if self.teachers == "both":
            use_gen = ent_g < ent_s  # ties go to the specialized teacher
            probs = torch.where(use_gen, generalized, specialized)
            entropy = torch.where(use_gen, ent_g, ent_s)
        elif self.teachers == "specialized":
            probs, entropy = specialized, ent_s
            use_gen = torch.zeros_like(ent_s, dtype=torch.bool)
        elif self.teachers == "generalized":
            probs, entropy = generalized, ent_g
            use_gen = torch.ones_like(ent_g, dtype=torch.bool)
        pseudo_label = probs.argmax(1, keepdim=True)
        if self.gate == "entropy":
            mask = (entropy < threshold).float()
        elif self.gate == "quantile":
            mask = classwise_quantile_mask(entropy, pseudo_label, threshold)
        elif self.gate == "soft":
            mask = (1.0 - entropy / math.log(probs.shape[1])).clamp(0.0, 1.0)
        else:
            mask = torch.ones_like(entropy)
        if self.teachers in ("both", "by_class") and self.disagreement == "mask":
            mask = mask * (specialized.argmax(1, keepdim=True) == generalized.argmax(1, keepdim=True)).float()
        guarded = None
        if self.guard == "prior":
            probs_for_prior = prior_probs if prior_probs is not None else specialized
            if class_prior is None or probs_for_prior is None:
                raise ValueError("guard='prior' needs class_prior and the EMA teacher's probabilities")
            allowed = expected_class_guard(probs_for_prior, pseudo_label, class_prior)
            guarded = (allowed == 0) & (mask > 0)
            mask = mask * allowed
        return GateResult(pseudo_label, mask, use_gen, entropy, guarded)


class PseudoLabelLoss(nn.Module):
    """Masked cross-entropy plus masked Dice over the gated voxels (Dice over foreground classes).

    ``nesting="labelled"``: with ``parents`` (:func:`nested_parents` of the labelled data) given to the
    call, a voxel pseudo-labelled ``p`` is supervised as "``p`` or a class inside ``p``": its
    cross-entropy is ``-log`` of their summed probability, ``p``'s Dice is on that sum, and the Dice of
    each class inside ``p`` does not see it. Without nested classes it is the plain loss."""

    def __init__(self, lambda_ce: float = 1.0, lambda_dice: float = 1.0, nesting: str = "none") -> None:
        super().__init__()
        if nesting not in NESTING_MODES:
            raise ValueError(f"nesting must be one of {NESTING_MODES}, got {nesting!r}")
        self.lambda_ce = lambda_ce
        self.lambda_dice = lambda_dice
        self.nesting = nesting
        self.smooth = 1e-5  # MONAI's DiceLoss defaults (smooth_nr, smooth_dr)
        self.dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def forward(
        self,
        logits: torch.Tensor,
        pseudo_label: torch.Tensor,
        mask: torch.Tensor,
        parents: list[int | None] | None = None,
    ) -> torch.Tensor:
        if mask.sum() == 0:
            return logits.sum() * 0.0  # nothing confident enough yet: no pseudo supervision
        if self.nesting == "labelled" and parents is not None and any(p is not None for p in parents):
            return self._nested(logits, pseudo_label, mask, nesting_matrix(parents).to(logits))
        ce = F.cross_entropy(logits, pseudo_label[:, 0], reduction="none")[:, None]
        ce = (ce * mask).sum() / mask.sum()
        return self.lambda_ce * ce + self.lambda_dice * self.dice(logits, pseudo_label, mask=mask)

    def _nested(
        self, logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor, matrix: torch.Tensor
    ) -> torch.Tensor:
        num_classes = logits.shape[1]
        merged = torch.einsum("jk,bk...->bj...", matrix, torch.softmax(logits, 1))  # P(j or inside j)
        onehot = F.one_hot(pseudo_label[:, 0].long(), num_classes).movedim(-1, 1).to(logits)
        target = torch.einsum("jk,bk...->bj...", matrix, onehot)  # 1 for the label and every class around it
        # the classes inside the pseudo-label are unknown there: their Dice leaves those voxels out
        inside_label = torch.einsum("jk,bj...->bk...", matrix - torch.eye(num_classes).to(matrix), onehot)
        channel_mask = mask * (1.0 - inside_label.clamp_max(1.0))
        ce = -torch.log(merged.gather(1, pseudo_label.long()).clamp_min(1e-12))
        ce = (ce * mask).sum() / mask.sum()
        dims = [0, *range(2, logits.ndim)]  # batch Dice: one ratio per class over the whole batch
        fg = slice(1, None)
        overlap = (channel_mask * merged * target)[:, fg].sum(dims)
        sizes = (channel_mask * merged)[:, fg].sum(dims) + (channel_mask * target)[:, fg].sum(dims)
        dice = (1.0 - (2.0 * overlap + self.smooth) / (sizes + self.smooth)).mean()
        return self.lambda_ce * ce + self.lambda_dice * dice
