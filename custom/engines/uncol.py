"""UnCoL's training iterations, plugged into MONAI's ``SupervisedTrainer`` via ``iteration_update``.

Everything around the iteration (validation, checkpoints, logging, LR schedule) stays MONAI/Ignite
handlers; these callables hold only the step's own logic.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from custom.losses.distillation import SemanticDistillationLoss, VisualDistillationLoss
from custom.teachers.generalized import GeneralizedTeacher
from custom.teachers.targets import FUSION_KEY, VALID_KEY, distillation_targets, unfold_fusion


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


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

    def __call__(self, engine, batch: dict) -> dict:
        images, labels = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
        # MONAI's event protocol, so its handlers (decollation, post-processing, metrics) work as usual
        engine.state.output = output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        cuda_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda") if cuda_amp else nullcontext():
            feats = engine.network.forward_features(images)
            output[Keys.PRED] = engine.network.decode(feats)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = {"sup": engine.loss_function(output[Keys.PRED], labels)}
            if self.visual is not None or self.semantic is not None:
                grid = list(feats["layer1"].shape[2:])
                targets = self._targets(batch, images, labels, grid)
                if self.visual is not None:
                    terms["visual"] = self.visual(feats, targets)
                if self.semantic is not None:
                    num_fg = targets[VALID_KEY].shape[1]
                    fusion = unfold_fusion(targets[FUSION_KEY].float(), num_fg)
                    terms["semantic"] = self.semantic(feats, fusion, targets[VALID_KEY].bool())
            loss = terms["sup"]
            if "visual" in terms:
                loss = loss + self.visual_weight * terms["visual"]
            if "semantic" in terms:
                loss = loss + self.semantic_weight * terms["semantic"]
            output[Keys.LOSS] = loss
            output.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if cuda_amp and getattr(engine, "scaler_", None) is not None:
            engine.scaler_.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler_.step(engine.optimizer)
            engine.scaler_.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
