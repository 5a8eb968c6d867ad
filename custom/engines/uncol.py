"""UnCoL's training iterations, plugged into MONAI's ``SupervisedTrainer`` via ``iteration_update``.

Everything around the iteration (validation, checkpoints, logging, LR schedule) stays MONAI/Ignite
handlers; these callables hold only the step's own logic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch.profiler import record_function

from custom.engines.copy_paste import BidirectionalCopyPaste
from custom.losses.distillation import SemanticDistillationLoss, VisualDistillationLoss
from custom.losses.pseudo_label import EntropyGate, GateResult, border_class_counts, nested_parents
from custom.teachers.cache import image_key
from custom.teachers.generalized import GeneralizedTeacher, compose_class_probs, mask_areas
from custom.teachers.prompts import Prompts
from custom.teachers.targets import FUSION_KEY, VALID_KEY, distillation_targets, unfold_fusion

logger = logging.getLogger(__name__)


def _optimise(engine, loss: torch.Tensor, cuda_amp: bool) -> dict:
    """Backward and optimiser step (with AMP's grad scaler on CUDA), firing MONAI's iteration events."""
    scaler = getattr(engine, "scaler_", None) if cuda_amp else None
    with record_function("uncol/backward"):
        (loss if scaler is None else scaler.scale(loss)).backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    with record_function("uncol/optimiser"):
        if scaler is None:
            engine.optimizer.step()
        else:
            scaler.step(engine.optimizer)
            scaler.update()
    engine.state.output[Keys.LOSS] = loss.detach()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output


def same_prompts(a: Prompts, b: Prompts, tolerance: float = 0.0) -> bool:
    """True when ``a`` and ``b`` prompt the same classes (and, with one prompt per connected component,
    the same component slots) and no box edge or point of any prompt moved by more than ``tolerance``
    pixels (0: identical)."""

    def close(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return x.shape == y.shape and bool(((x.cpu().float() - y.cpu().float()).abs() <= tolerance).all())

    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return x.shape == y.shape and torch.equal(x.cpu(), y.cpu())

    return (
        same(a.valid, b.valid)
        and same(a.components, b.components)
        and close(a.boxes, b.boxes)
        and close(a.points, b.points)
    )


def shift_prompts(prompts: Prompts, top: int, left: int) -> Prompts:
    """``prompts`` drawn on a patch, moved to the coordinates of the image the patch was cut from at row
    ``top``, column ``left`` (boxes are ``x0, y0, x1, y1``, points ``x, y``: ``x`` is the column)."""
    offset = torch.tensor([left, top], dtype=torch.float32)

    def moved(x: torch.Tensor | None, repeats: int) -> torch.Tensor | None:
        return None if x is None else x + offset.to(x).repeat(repeats)

    return Prompts(prompts.valid, moved(prompts.boxes, 2), moved(prompts.points, 1), prompts.components)


def every_kth_slice(prompts: Prompts, slices: int, stride: int, offset: int) -> Prompts:
    """``prompts`` of volumes cut into ``slices`` slices each (volume after volume), kept on the slices
    ``offset``, ``offset + stride``, ... of each volume only; the other slices get no prompt (abstain)."""
    keep = (torch.arange(len(prompts.valid), device=prompts.valid.device) % slices) % stride == offset
    components = None if prompts.components is None else prompts.components & keep[:, None, None]
    return Prompts(prompts.valid & keep[:, None], prompts.boxes, prompts.points, components)


def drop_channels(feats: dict[str, torch.Tensor], first: int, rate: float) -> dict[str, torch.Tensor]:
    """``feats`` with whole channels of the samples from ``first`` on zeroed at ``rate`` (the others scaled
    by ``1 / (1 - rate)``), the samples before ``first`` untouched: a feature-level perturbation of the
    unlabelled rows (UniMatch's channel dropout), so the decoder must work from part of the encoding."""
    out = {}
    for name, x in feats.items():
        dropout = F.dropout3d if x.ndim == 5 else F.dropout2d
        out[name] = torch.cat([x[:first], dropout(x[first:], rate, training=True)])
    return out


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


#: which distillation paths each ``distillation`` setting turns on
DISTILLATION_PATHS = {"none": (), "visual": ("visual",), "semantic": ("semantic",), "both": ("visual", "semantic")}
DISTILLATION_TARGETS = ("cached", "per_view")


class DistillationIteration:
    """Stage 1: ``L = L_sup + w_vis * L_visual + w_sem * L_semantic`` on a labelled batch.

    Teacher targets are read from the batch (``<prefix><name>`` keys added by ``TeacherTargetsd``,
    i.e. cached, augmented together with the image) or, when ``teacher`` is given, computed from the
    augmented batch at every step (exact for any augmentation, and as slow as the teacher).
    A path whose loss is ``None`` is off: no term, no parameters.

    The returned output carries ``loss`` and one ``loss_<term>`` float per active term for handlers.
    """

    def __init__(
        self,
        visual: VisualDistillationLoss | None = None,
        semantic: SemanticDistillationLoss | None = None,
        visual_weight: float = 1.0,
        semantic_weight: float = 1.0,
        teacher: GeneralizedTeacher | None = None,
        prefix: str = "teacher_",
    ) -> None:
        self.visual = visual
        self.semantic = semantic
        self.visual_weight = visual_weight
        self.semantic_weight = semantic_weight
        self.teacher = teacher
        self.prefix = prefix

    @classmethod
    def build(
        cls,
        mode: str,
        teacher: GeneralizedTeacher,
        spatial_dims: int,
        student_dim: int,
        num_classes: int,
        student_layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        visual_weight: float = 1.0,
        semantic_weight: float = 1.0,
        targets: str = "cached",
    ) -> DistillationIteration:
        """The distillation a configuration asks for: the paths of ``mode`` (:data:`DISTILLATION_PATHS`),
        the visual one pairing ``student_layers`` with the teacher's encoder features in order, the
        semantic one over the ``num_classes - 1`` foreground classes; with ``targets="per_view"`` the
        teacher runs on every augmented batch instead of the cached targets being read."""
        if mode not in DISTILLATION_PATHS:
            raise ValueError(f"distillation must be one of {tuple(DISTILLATION_PATHS)}, got {mode!r}")
        if targets not in DISTILLATION_TARGETS:
            raise ValueError(f"distillation_targets must be one of {DISTILLATION_TARGETS}, got {targets!r}")
        paths = DISTILLATION_PATHS[mode]
        visual = semantic = None
        if "visual" in paths:
            pairs = dict(zip(student_layers, teacher.feature_names, strict=False))
            visual = VisualDistillationLoss(spatial_dims, student_dim, pairs, teacher.feature_channels)
        if "semantic" in paths:
            semantic = SemanticDistillationLoss(student_dim, num_classes - 1)
        per_view = teacher if targets == "per_view" and paths else None
        return cls(visual, semantic, visual_weight, semantic_weight, per_view)

    @property
    def active(self) -> bool:
        """Whether any distillation path is on."""
        return self.visual is not None or self.semantic is not None

    @property
    def modules(self) -> nn.ModuleList:
        """The training-only modules whose parameters the optimiser must also update."""
        return nn.ModuleList([m for m in (self.visual, self.semantic) if m is not None])

    def _targets(self, batch: dict, images: torch.Tensor, labels: torch.Tensor, grid: list[int]) -> dict:
        if self.teacher is not None:
            out = self.teacher(images, labels=labels, with_fusion=self.semantic is not None)
            return distillation_targets(out, grid)
        keys = [k for k in batch if isinstance(k, str) and k.startswith(self.prefix)]
        return {k[len(self.prefix) :]: _plain(batch[k]).to(images.device) for k in keys}

    def terms(self, feats: dict[str, torch.Tensor], batch: dict, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """The active distillation terms for a labelled batch, from the student's features."""
        terms: dict[str, torch.Tensor] = {}
        if self.visual is None and self.semantic is None:
            return terms
        targets = self._targets(batch, images, labels, list(feats["layer1"].shape[2:]))
        if self.visual is not None:
            terms["visual"] = self.visual(feats, targets)
        if self.semantic is not None:
            num_fg = targets[VALID_KEY].shape[1]
            fusion = unfold_fusion(targets[FUSION_KEY].float(), num_fg)
            terms["semantic"] = self.semantic(feats, fusion, targets[VALID_KEY].bool())
        return terms

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """``w_vis * L_visual + w_sem * L_semantic`` over the active terms."""
        weights = {"visual": self.visual_weight, "semantic": self.semantic_weight}
        return sum(weights[k] * v for k, v in terms.items())

    def __call__(self, engine, batch: dict) -> dict:
        images, labels = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
        # MONAI's event protocol, so its handlers (decollation, post-processing, metrics) work as usual
        engine.state.output = output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        cuda_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda") if cuda_amp else nullcontext():
            with record_function("uncol/student_forward"):
                feats = engine.network.forward_features(images)
                output[Keys.PRED] = engine.network.decode(feats)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            with record_function("uncol/losses"):
                terms = {"sup": engine.loss_function(output[Keys.PRED], labels)}
                terms.update(self.terms(feats, batch, images, labels))
                loss = terms["sup"] + self.weighted({k: v for k, v in terms.items() if k != "sup"})
            output[Keys.LOSS] = loss
            output.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        return _optimise(engine, loss, cuda_amp)


def random_flip_rot90(tensors: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Apply one random flip / 90-degree rotation per sample, the same to every tensor in ``tensors``
    (all ``(B, C, *S)``, same ``S``), in the first two spatial axes. Keeps pseudo-labels aligned with
    the student's view of the image. Where those axes differ in length only half-turns are drawn, so
    every sample keeps the batch's shape."""
    out: list[list[torch.Tensor]] = [[] for _ in tensors]
    dims = (2, 3)
    square = tensors[0].shape[2] == tensors[0].shape[3]
    for i in range(tensors[0].shape[0]):
        turns = torch.randint(4 if square else 2, (1,), generator=generator)
        k = int(turns) if square else 2 * int(turns)
        flip = bool(torch.randint(2, (1,), generator=generator))
        for j, t in enumerate(tensors):
            x = t[i : i + 1]
            if flip:
                x = x.flip(dims[0])
            out[j].append(torch.rot90(x, k, dims))
    return [torch.cat(parts) for parts in out]


class Teachers(NamedTuple):
    """Stage 2's two teachers: the EMA model and the generalized teacher (None when not used)."""

    specialized: nn.Module
    generalized: GeneralizedTeacher | None


class GeneralizedMasks(NamedTuple):
    """One image's generalized-teacher masks as stage 2 stores them for reuse: the mask decoder's logits
    ``(C - 1, *S)`` before any temperature (a recalibration keeps them valid), which classes were prompted
    ``(C - 1,)``, and, for a window of a larger image, the whole masks' :func:`mask_areas` ``(C - 1,)``
    (their painter's order; None: the window is the image)."""

    logits: torch.Tensor
    valid: torch.Tensor
    areas: torch.Tensor | None

    def to(self, device: torch.device | str) -> GeneralizedMasks:
        return GeneralizedMasks(*(None if x is None else x.to(device) for x in self))


class ClassVoxels(NamedTuple):
    """Voxels per class ``(C,)`` of the kept pseudo-labels and of the labelled batches (None: no step yet)."""

    kept: torch.Tensor | None
    labelled: torch.Tensor | None


#: the schedule each gate reads (``gate="none"`` reads none)
GATE_SCHEDULES = {"entropy": "entropy_threshold", "quantile": "keep_fraction"}


class SemiSupervisedIteration:
    """Stage 2: ``L = L_sup + lambda_u(t) * L_pseudo`` on a labelled and an unlabelled batch.

    On the unlabelled batch's un-augmented (weak) view the specialized teacher (EMA of the student,
    eval mode) and the generalized teacher (prompted with boxes from the specialized teacher's
    prediction: its argmax, one box per class or per connected component as the teacher's ``box_mode``
    says, optionally only for regions its softmax is confident about) give class probabilities; the
    :class:`EntropyGate` picks each voxel's pseudo-label from the more certain one and masks voxels
    above the threshold. The student sees the strong view (intensity-augmented), and one random
    flip/rotation per sample is applied to that view and to the pseudo-labels and mask alike.

    Handlers work through a small interface: :meth:`set_schedule` (the gate's cut and ``lambda_u``, from
    :class:`~custom.handlers.ramps.ScheduleHandler`\\ s), :attr:`teachers`, :meth:`set_temperatures`
    (calibration), :meth:`set_class_owners` (``teachers="by_class"``), :attr:`class_voxels` /
    :meth:`reset_class_voxels` (pseudo-label coverage) and :meth:`pseudo_labels` (audits).

    Args:
        gate: the entropy gate (which teachers, gate on/off).
        pseudo_loss: loss on the gated voxels.
        specialized: the EMA model (``EMAHandler.ema_model``); unused when ``gate.teachers == "generalized"``
            except to prompt the generalized teacher.
        generalized: the generalized teacher; not used (may be None) when ``gate.teachers == "specialized"``.
        seed: seed of the spatial augmentation of the unlabelled stream.
        strong_key: key of the student's (strong) view in the unlabelled batch.
        distillation: stage 1's distillation, continued on the labelled batch (None, or one with no path: off).
        reuse_generalized: keep each unlabelled image's generalized-teacher output in memory and reuse it
            while the image's prompts stay the same (no decoder call).
        reuse_tolerance: pixels any box edge or point (of every class or component prompt) may move for
            the stored output still to count as "the same prompts". 0 is exact; a pixel or two trades a
            slightly stale pseudo-label (the prompts come from the EMA teacher's own, noisy boxes) for far
            fewer decoder calls.
        context_key: key of the unlabelled batch's crop contexts (``RandGridCropd(context_key=...)``): when
            the batch has it, the generalized teacher works on whole slices (see :meth:`teacher_probs`).
        slice_stride: 3D: the generalized teacher is prompted on every ``slice_stride``-th slice of each
            volume (from a random offset each step); the others get no prompt, so its uniform abstention
            leaves them to the specialized teacher. Its mask decoder, slice by slice, is most of a 3D
            step: a stride of k divides that cost by k. 1: every slice.
        copy_paste: when given, the student sees each unlabelled view mixed both ways with a labelled
            patch (:class:`~custom.engines.copy_paste.BidirectionalCopyPaste`) instead of the view alone,
            supervised by the ground truth where a voxel came from the labelled patch and by the gated
            pseudo-label elsewhere (both under ``lambda_u``); the student's batch grows by the
            unlabelled batch size.
        feature_dropout: rate of channel dropout on the encoder features of the unlabelled rows before
            the decoder (0: off), a feature-level perturbation beside the strong view's image-level one.
    """

    #: the scheduled values a step reads: the entropy gate's threshold (nats), the quantile gate's kept
    #: fraction of each pseudo-class, and the pseudo-label loss weight ``lambda_u``
    SCHEDULES = ("entropy_threshold", "keep_fraction", "unsup_weight")

    def __init__(
        self,
        gate: EntropyGate,
        pseudo_loss: nn.Module,
        specialized: nn.Module,
        generalized: GeneralizedTeacher | None = None,
        seed: int = 0,
        strong_key: str = "image_strong",
        distillation: DistillationIteration | None = None,
        reuse_generalized: bool = True,
        reuse_tolerance: float = 0.0,
        context_key: str | None = "image_context",
        slice_stride: int = 1,
        copy_paste: BidirectionalCopyPaste | None = None,
        feature_dropout: float = 0.0,
    ) -> None:
        if gate.teachers != "specialized" and generalized is None:
            raise ValueError(f"teachers={gate.teachers!r} needs the generalized teacher")
        if slice_stride < 1:
            raise ValueError(f"slice_stride must be at least 1, got {slice_stride}")
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.gate = gate
        self.pseudo_loss = pseudo_loss
        self.specialized = specialized
        self.generalized = generalized if gate.teachers != "specialized" else None
        self.generator = torch.Generator().manual_seed(seed)
        self.strong_key = strong_key
        self.distillation = distillation if distillation is not None and distillation.active else None
        self.reuse_generalized = reuse_generalized
        self.reuse_tolerance = reuse_tolerance
        self.context_key = context_key
        self.slice_stride = slice_stride
        self.copy_paste = copy_paste
        self.feature_dropout = feature_dropout
        #: per image (and window) key: its prompts and the generalized teacher's masks for them
        self._generalized_memo: dict[str, tuple[Prompts, GeneralizedMasks]] = {}
        #: divides the EMA teacher's logits before its softmax (set by ``TeacherCalibration``; 1: off)
        self.specialized_temperature = 1.0
        #: ``(C - 1,)`` bool, True where the generalized teacher teaches a foreground class (``teachers="by_class"``;
        #: set by ``TeacherReliability``)
        self.class_owners: torch.Tensor | None = None
        self.generalized_calls = 0
        self.generalized_reused = 0
        #: of the images the last teacher_probs gave the generalized teacher (in 3D its slices), the share reused
        self.reused_share = 0.0
        #: voxels per class of the kept pseudo-labels and of the labelled batches since the last reset
        #: (``PseudoLabelCoverage`` reads them: a class the pseudo-labels never contain is being unlearned)
        self.kept_class_voxels: torch.Tensor | None = None
        self.labelled_class_voxels: torch.Tensor | None = None
        #: voxels per class of every labelled batch so far (never reset): the class guard's prior
        self.labelled_class_total: torch.Tensor | None = None
        #: ``(C, C)`` border counts of every labelled batch so far (``nesting="labelled"`` only): which
        #: class lies inside which (:func:`~custom.losses.pseudo_label.nested_parents`)
        self.labelled_border_total: torch.Tensor | None = None
        self.parents: list[int | None] | None = None
        self._schedules: dict[str, float] = {}

    def set_schedule(self, name: str, value: float) -> None:
        """Set scheduled value ``name`` (one of :attr:`SCHEDULES`) for the next steps."""
        if name == "gate_threshold":
            raise ValueError(
                "schedule 'gate_threshold' was split by meaning: name it 'entropy_threshold' (gate='entropy', "
                "nats) or 'keep_fraction' (gate='quantile'), e.g. custom.handlers.ramps.gate_schedule's"
            )
        if name not in self.SCHEDULES:
            raise ValueError(f"stage 2 takes the schedules {self.SCHEDULES}, not {name!r}")
        self._schedules[name] = float(value)

    def scheduled(self, name: str, engine: Engine | None = None) -> float | None:
        """The value of schedule ``name`` the next step uses: the one :meth:`set_schedule` set, else
        ``engine.state.<name>`` (or, for the gate's schedule, the ``engine.state.gate_threshold`` that
        configurations before 0.8 wrote); None when there is none."""
        if name in self._schedules:
            return self._schedules[name]
        state = getattr(engine, "state", None)
        value = getattr(state, name, None)
        if value is None and name == self.gate_schedule:
            value = getattr(state, "gate_threshold", None)
        return None if value is None else float(value)

    @property
    def gate_schedule(self) -> str | None:
        """The schedule the gate reads (:data:`GATE_SCHEDULES`); None for ``gate="none"``."""
        return GATE_SCHEDULES.get(self.gate.gate)

    def gate_level(self, engine: Engine | None = None) -> float:
        """The gate's current cut (the entropy threshold or the kept fraction; 0 without a gate)."""
        if self.gate_schedule is None:
            return 0.0
        level = self.scheduled(self.gate_schedule, engine)
        if level is None:
            raise RuntimeError(
                f"stage 2's {self.gate.gate} gate has no threshold: attach a ScheduleHandler with its "
                f"{self.gate_schedule!r} schedule (custom.handlers.ramps.gate_schedule) or use gate='none'"
            )
        return level

    @property
    def teachers(self) -> Teachers:
        """The specialized (EMA) and the generalized teacher (None when ``teachers="specialized"``)."""
        return Teachers(self.specialized, self.generalized)

    def set_temperatures(self, specialized: float, generalized: float | torch.Tensor | None = None) -> None:
        """Divide the EMA teacher's logits by ``specialized`` before its softmax and the generalized
        teacher's mask logits by ``generalized`` (scalar or one per class; None leaves it). The generalized
        teacher's stored outputs are logits: they stay, and the new temperature applies from the next step."""
        self.specialized_temperature = float(specialized)
        if self.generalized is not None and generalized is not None:
            self.generalized.mask_temperature = generalized

    def set_class_owners(self, owners: torch.Tensor) -> None:
        """Which teacher teaches each foreground class under ``teachers="by_class"``: ``(C - 1,)`` bool, True
        for the generalized teacher."""
        self.class_owners = torch.as_tensor(owners, dtype=torch.bool).flatten()

    @property
    def class_voxels(self) -> ClassVoxels:
        """Voxels per class of the kept pseudo-labels and of the labelled batches since the last
        :meth:`reset_class_voxels`: a class the pseudo-labels never hold is being unlearned."""
        return ClassVoxels(self.kept_class_voxels, self.labelled_class_voxels)

    def reset_class_voxels(self) -> None:
        """Start counting :attr:`class_voxels` afresh."""
        self.kept_class_voxels = self.labelled_class_voxels = None

    def _class_prior(self) -> torch.Tensor | None:
        """Each class's share of the labelled voxels so far, for the class guard (None without it)."""
        if self.gate.guard == "none" or self.labelled_class_total is None:
            return None
        return self.labelled_class_total.float() / self.labelled_class_total.sum()

    @torch.no_grad()
    def pseudo_labels(
        self, weak: torch.Tensor, engine: Engine | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, GateResult]:
        """Both teachers' class probabilities on the weak view ``weak`` and the gate's decision at its
        current cut, for audits: the generalized teacher's outputs are fresh and not stored for the
        training steps to reuse, and the iteration's counters stay as they were."""
        counters, reuse = (self.generalized_calls, self.generalized_reused), self.reuse_generalized
        self.reuse_generalized = False
        try:
            spec, gen = self.teacher_probs(weak)
        finally:
            self.reuse_generalized = reuse
            self.generalized_calls, self.generalized_reused = counters
        specialized = spec if self.gate.teachers != "generalized" else None
        gated = self.gate(
            specialized,
            gen,
            self.gate_level(engine),
            class_prior=self._class_prior(),
            prior_probs=spec,
            owners=self.class_owners,
        )
        return spec, gen, gated

    @torch.no_grad()
    def teacher_probs(
        self, weak: torch.Tensor, context: list[torch.Tensor] | None = None, starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both teachers' class probabilities on the weak view ``(B, 1, *roi)``.

        ``context`` (each patch's whole slices or whole image, see :mod:`custom.data.crops`) and ``starts``
        (``(B, D)``, where each patch starts in its context): the generalized teacher encodes the whole
        slices (a slice is encoded once, whichever patch of it is drawn, and LiteMedSAM sees the anatomy
        around the patch), is prompted with the specialized teacher's boxes moved to the slice's
        coordinates, and its masks are cut to the patch. Without them it sees the patch alone.
        """
        reused, calls = self.generalized_reused, self.generalized_calls
        self.specialized.eval()
        with record_function("uncol/specialized_teacher"):
            spec = torch.softmax(self.specialized(weak).float() / self.specialized_temperature, 1)
        with record_function("uncol/generalized_teacher"):
            gen = None
            if self.generalized is not None:
                # prompts: boxes of the specialized teacher's current prediction (its softmax goes in, so that
                # a confidence filter can see it; the regions are its argmax); volumes slice by slice, as the
                # generalized teacher sees them, so that reuse and decoder batching work per slice
                if context is not None:
                    in_context = self._generalized_in_context
                    parts = [in_context(spec[i : i + 1], context[i], starts[i]) for i in range(len(weak))]
                    gen = torch.cat(parts).to(spec)
                elif weak.ndim == 5:
                    slices = self.generalized.to_slices(weak)
                    prompts = self._strided(self.generalized.make_prompts(self.generalized.to_slices(spec)), spec)
                    gen = self.generalized.from_slices(self._generalized_probs(slices, prompts), len(weak)).to(spec)
                else:
                    gen = self._generalized_probs(weak, self.generalized.make_prompts(spec)).to(spec)
        self.reused_share = (self.generalized_reused - reused) / max(self.generalized_calls - calls, 1)
        return spec, gen

    def _generalized_in_context(self, spec: torch.Tensor, context: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One patch's generalized-teacher probabilities ``(1, 1 + C, *roi)`` from its context's whole
        slices (``spec``: the specialized teacher's ``(1, 1 + C, *roi)`` softmax on the patch)."""
        teacher = self.generalized
        volume = spec.ndim == 5
        context = context.to(spec.device, torch.float32)[None]
        in_plane = [a for a in range(spec.ndim - 2) if not volume or a != teacher.slice_axis]
        top, left = (int(start[a]) for a in in_plane)
        height, width = (spec.shape[2 + a] for a in in_plane)
        slices = teacher.to_slices(context) if volume else context
        prompts = shift_prompts(teacher.make_prompts(teacher.to_slices(spec) if volume else spec), top, left)
        if volume:
            prompts = self._strided(prompts, spec)
        window = (slice(top, top + height), slice(left, left + width))
        probs = self._generalized_probs(slices, prompts, window=window)
        return teacher.from_slices(probs, 1) if volume else probs

    def _strided(self, prompts: Prompts, volumes: torch.Tensor) -> Prompts:
        """The per-slice ``prompts`` of ``volumes`` ``(B, C, *S)`` kept on every ``slice_stride``-th slice."""
        if self.slice_stride == 1:  # no draw: the flips' random stream stays as it was
            return prompts
        offset = int(torch.randint(self.slice_stride, (1,), generator=self.generator))
        slices = volumes.shape[2 + self.generalized.slice_axis]
        return every_kth_slice(prompts, slices, self.slice_stride, offset)

    def _count_labelled(self, labels: torch.Tensor, num_classes: int) -> None:
        # on the batch's device: read (and synchronised) once an epoch by the handler, not every step
        counts = torch.bincount(labels.long().flatten(), minlength=num_classes)
        self.labelled_class_voxels = (
            counts if self.labelled_class_voxels is None else self.labelled_class_voxels + counts
        )
        self.labelled_class_total = counts if self.labelled_class_total is None else self.labelled_class_total + counts

    def update_nesting(self, labels: torch.Tensor, num_classes: int) -> list[int | None]:
        """Which class lies inside which, from every labelled batch so far (this one included)."""
        counts = border_class_counts(labels, num_classes)
        total = self.labelled_border_total
        self.labelled_border_total = counts if total is None else total + counts
        parents = nested_parents(self.labelled_border_total)
        if parents != self.parents:
            inside = ", ".join(f"{c} inside {p}" for c, p in enumerate(parents) if p is not None) or "none"
            logger.info(f"pseudo-label nesting from the labelled batches: {inside}")
            self.parents = parents
        return parents

    def _count_kept(self, kept: torch.Tensor, num_classes: int) -> None:
        counts = torch.bincount(kept.long().flatten(), minlength=num_classes)
        self.kept_class_voxels = counts if self.kept_class_voxels is None else self.kept_class_voxels + counts

    def _generalized_probs(
        self, weak: torch.Tensor, prompts: Prompts, window: tuple[slice, slice] | None = None
    ) -> torch.Tensor:
        """The generalized teacher's class probabilities, its mask logits reused when an image comes back
        with the same prompts (they depend only on the image and the prompts, and the EMA teacher's boxes
        settle as training goes on); only the others go through the mask decoder. The teacher's current
        mask temperature applies to every image at each call, so a recalibration keeps what is stored.
        ``window``: the rows and columns of each image to return (a patch of whole slices); reuse is per
        image and window, and the classes are painted in the order of their whole masks (as decoded)."""
        teacher = self.generalized
        keys: list[str | None] = [None] * len(weak)
        if self.reuse_generalized:
            where = () if window is None else (torch.tensor([window[0].start, window[1].start]),)
            keys = [image_key(img, *where) for img in weak]
        parts: list[GeneralizedMasks | None] = [None] * len(weak)
        for i, key in enumerate(keys):
            hit = self._generalized_memo.get(key) if key is not None else None
            if hit is not None and same_prompts(hit[0], prompts[i : i + 1], self.reuse_tolerance):
                parts[i] = hit[1].to(weak.device)
                self.generalized_reused += 1
        todo = [i for i, x in enumerate(parts) if x is None]
        for chunk in (todo[k : k + teacher.slice_batch] for k in range(0, len(todo), teacher.slice_batch)):
            index = torch.tensor(chunk)  # slice_batch bounds the decoder's memory when a batch is many slices
            fresh = teacher(weak[index], prompts=prompts[index], with_fusion=False, with_features=False)
            logits, areas = fresh.mask_logits, None
            if window is not None:
                logits, areas = logits[(..., *window)], mask_areas(teacher.tempered(logits))
            for j, i in enumerate(chunk):
                parts[i] = GeneralizedMasks(logits[j], fresh.valid[j], None if areas is None else areas[j])
                if keys[i] is not None:
                    self._generalized_memo[keys[i]] = (prompts[i : i + 1], parts[i].to("cpu"))
        self.generalized_calls += len(weak)
        logits, valid = torch.stack([p.logits for p in parts]), torch.stack([p.valid for p in parts])
        areas = None if window is None else torch.stack([p.areas for p in parts])
        return compose_class_probs(teacher.tempered(logits), valid, teacher.abstain, areas)

    def __call__(self, engine, batch: dict) -> dict:
        device = engine.state.device
        labelled, unlabelled = batch["labelled"], batch["unlabelled"]
        images, labels = engine.prepare_batch(labelled, device, engine.non_blocking)
        weak = _plain(unlabelled["image"]).to(device)
        strong = _plain(unlabelled[self.strong_key]).to(device)
        level = self.gate_level(engine)
        unsup_weight = self.scheduled("unsup_weight", engine)
        unsup_weight = 1.0 if unsup_weight is None else unsup_weight

        context = unlabelled.get(self.context_key) if self.context_key else None
        starts = unlabelled.get(f"{self.context_key}_start") if context is not None else None
        spec, gen = self.teacher_probs(weak, context, starts)
        with record_function("uncol/gate"):
            # this batch counts towards the guard's prior before it is used
            self._count_labelled(labels, spec.shape[1])
            gated = self.gate(
                spec if self.gate.teachers != "generalized" else None,
                gen,
                level,
                class_prior=self._class_prior(),
                prior_probs=spec,
                owners=self.class_owners,
            )
            self._count_kept(gated.pseudo_label[gated.mask.bool()], spec.shape[1])
            nesting = {}
            if getattr(self.pseudo_loss, "nesting", "none") == "labelled":
                nesting["parents"] = self.update_nesting(labels, spec.shape[1])
            strong, pseudo, mask = random_flip_rot90(
                [strong, gated.pseudo_label.float(), gated.mask], generator=self.generator
            )
            if self.copy_paste is not None:
                strong, pseudo, mask = self.copy_paste(_plain(images), _plain(labels), strong, pseudo, mask)[:3]

        engine.state.output = output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        cuda_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda") if cuda_amp else nullcontext():
            n = len(images)
            with record_function("uncol/student_forward"):
                feats = engine.network.forward_features(torch.cat([images, strong]))
                perturbed = drop_channels(feats, len(images), self.feature_dropout) if self.feature_dropout else feats
                logits = engine.network.decode(perturbed)
            output[Keys.PRED] = logits[:n]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            with record_function("uncol/losses"):
                loss_sup = engine.loss_function(output[Keys.PRED], labels)
                loss_pseudo = self.pseudo_loss(logits[n:].float(), pseudo.long(), mask, **nesting)
                loss = loss_sup + unsup_weight * loss_pseudo
                distill = {}
                if self.distillation is not None:
                    distill = self.distillation.terms({k: v[:n] for k, v in feats.items()}, labelled, images, labels)
                    loss = loss + self.distillation.weighted(distill)
            output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if self.gate_schedule is not None:
            output[f"gate_{self.gate_schedule}"] = level
        output.update(
            loss_sup=float(loss_sup.detach()),
            loss_pseudo=float(loss_pseudo.detach()),
            unsup_weight=unsup_weight,
            **gated.stats(),
            **{f"loss_{k}": float(v.detach()) for k, v in distill.items()},
        )
        if self.generalized is not None:
            output["generalized_reused"] = self.reused_share
        return _optimise(engine, loss, cuda_amp)
