"""Temperature scaling of stage 2's two teachers, so that their entropies are comparable in the gate.

The gate trusts the teacher with the lower entropy, so an overconfident teacher (LiteMedSAM's sigmoid
masks are) wins voxels it gets wrong. :class:`TeacherCalibration` fits one temperature per teacher by
minimising the negative log-likelihood of the true class on labelled images: for the specialized
teacher (the EMA student) ``softmax(logits / T_s)``; for the generalized teacher the mask decoder's
logits, ``sigmoid(logit_c / T_c)`` before the painter's composition (one ``T_c`` per foreground class
with ``per_class``), prompted as in training, by boxes of the EMA teacher's prediction. It refits at
the start of stage 2 and every ``interval`` epochs (the EMA teacher changes), and logs each fitted
temperature with the teacher's expected calibration error (ECE) before and after.

NLL and ECE are taken over the voxels near structures (where the truth or either teacher's
prediction is foreground): over all voxels the easy background would decide the temperature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from custom.handlers.records import append_record
from custom.metrics import calibration_bins, expected_calibration_error
from custom.teachers.generalized import compose_class_probs

logger = logging.getLogger(__name__)

CALIBRATION_MODES = ("none", "temperature")
#: the temperatures searched lie in [1 / LIMIT, LIMIT]
LIMIT = 20.0


def golden_section_minimum(f: Callable[[float], float], low: float, high: float, steps: int = 40) -> float:
    """The minimiser of a unimodal ``f`` on ``[low, high]`` (golden-section search, deterministic)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def fit_temperature(nll: Callable[[float], float]) -> float:
    """The temperature in ``[1 / LIMIT, LIMIT]`` minimising ``nll(T)``, searched over ``log T``."""
    log_t = golden_section_minimum(lambda x: nll(math.exp(x)), -math.log(LIMIT), math.log(LIMIT))
    return math.exp(log_t)


def class_nll(log_probs: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> float:
    """Mean ``-log p(true class)`` of ``(B, C, *S)`` log-probabilities over the voxels ``where`` (``(B, *S)``).

    Log-probabilities, not clamped probabilities: a floor on ``p`` would make a confidently wrong voxel
    cost the same at any temperature and pull the fit towards ever sharper (smaller) temperatures."""
    picked = log_probs.gather(1, truth[:, None]).squeeze(1)[where]
    return float(-picked.double().mean()) if picked.numel() else 0.0


def log_of(probs: torch.Tensor) -> torch.Tensor:
    """``log`` of probabilities computed in float64 (which keeps them apart from 0 far longer)."""
    return torch.log(probs.double().clamp_min(1e-300))


def ece(probs: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> float:
    return expected_calibration_error(calibration_bins(probs, truth, where=where))


def temper_masks(mask_logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``sigmoid(logit / temperature)`` of ``(B, C, *S)`` mask logits (temperature scalar or one per class),
    in float64."""
    logits = mask_logits.double()
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(logits).view(1, -1, *[1] * (logits.ndim - 2))
    return torch.sigmoid(logits / temperature)


def _pad16(x: torch.Tensor) -> torch.Tensor:
    """``(1, C, *S)`` padded at the end of every spatial axis to a multiple of 16 (the student's tokens)."""
    pad = []
    for n in reversed(x.shape[2:]):
        pad += [0, (-n) % 16]
    return F.pad(x, pad)


def load_cases(dataset: Sequence[dict], max_cases: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_cases`` items of ``dataset`` as ``(image (1, 1, *S), label (1, *S))`` pairs."""
    cases = []
    for i in range(min(len(dataset), max_cases)):
        item = dataset[i]
        cases.append((torch.as_tensor(item["image"])[None].float(), torch.as_tensor(item["label"])[None, 0].long()))
    return cases


@torch.no_grad()
def teacher_outputs(
    iteration, cases: Sequence[tuple[torch.Tensor, torch.Tensor]], inferer: Callable, device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """Both teachers of ``iteration`` (a stage-2 iteration, read through its ``teachers``) on labelled
    ``cases``, at temperature 1: the EMA teacher's logits, the generalized teacher's mask logits and
    prompt validity (prompted by the EMA teacher's boxes, as in training) and the truth, one entry per
    case. ``inferer`` runs the EMA teacher on a whole image (the validation's sliding window)."""
    specialized, teacher = iteration.teachers
    spec_logits, masks, valids, truths = [], [], [], []
    specialized.eval()
    for image, label in cases:
        padded = _pad16(image).to(device)
        region = tuple(slice(0, n) for n in image.shape[2:])
        logits = inferer(padded, specialized).float()[(slice(None), slice(None), *region)]
        spec_logits.append(logits.cpu())
        truths.append(label)
        if teacher is not None:
            spec = torch.softmax(logits, 1)
            image = image.to(device)
            if image.ndim == 5:  # slice by slice, as the teacher sees volumes
                slices, spec_slices = teacher.to_slices(image), teacher.to_slices(spec)
                out = teacher(slices, prompts=teacher.make_prompts(spec_slices), with_fusion=False, with_features=False)
                mask = teacher.from_slices(out.mask_logits, 1)
                valid = out.valid
            else:
                out = teacher(image, prompts=teacher.make_prompts(spec), with_fusion=False, with_features=False)
                mask, valid = out.mask_logits, out.valid
            masks.append(mask.cpu())
            valids.append(valid.cpu())
    return {"spec_logits": spec_logits, "masks": masks, "valids": valids, "truths": truths}


def compose_masks(
    teacher, masks: Sequence[torch.Tensor], valids: Sequence[torch.Tensor], temperature: float | torch.Tensor
) -> list[torch.Tensor]:
    """The generalized ``teacher``'s class probabilities (float64) from :func:`teacher_outputs`' mask logits
    and validity at ``temperature``, composed as the teacher does (volumes slice by slice)."""
    out = []
    for mask, valid in zip(masks, valids, strict=True):
        if mask.ndim == 5:  # (1, C, X, Y, Z): compose slice by slice, as the teacher does
            axis = teacher.slice_axis + 2
            slices = temper_masks(mask, temperature).movedim(axis, 1)[0]  # (Z, C, X, Y)
            probs = compose_class_probs(slices, valid, teacher.abstain)
            out.append(probs.movedim(0, axis - 1)[None])
        else:
            out.append(compose_class_probs(temper_masks(mask, temperature), valid, teacher.abstain))
    return out


class TeacherCalibration:
    """Fit and set both teachers' temperatures on labelled images at the start of stage 2 and every
    ``interval`` epochs (see the module docstring).

    Args:
        iteration: the :class:`~custom.engines.uncol.SemiSupervisedIteration` whose teachers are calibrated
            (read from its ``teachers``; the fitted temperatures go to its ``set_temperatures``).
        dataset: labelled cases (dicts with ``image`` and ``label``, deterministic transforms), e.g. the
            validation split; at most ``max_cases`` are used.
        inferer: runs the EMA teacher on a whole image (the validation's sliding-window inferer).
        mode: ``temperature`` (fit) or ``none`` (leave both at 1; the handler then does nothing).
        per_class: one mask temperature per foreground class for the generalized teacher.
        interval: epochs between refits.
        output_file: JSON lines, one record per fit (temperatures, NLL and ECE before/after).
    """

    def __init__(
        self,
        iteration,
        dataset: Sequence[dict],
        inferer: Callable,
        mode: str = "temperature",
        per_class: bool = True,
        interval: int = 1,
        max_cases: int = 8,
        output_file: str | Path | None = None,
    ) -> None:
        if mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {mode!r}")
        self.iteration = iteration
        self.dataset = dataset
        self.inferer = inferer
        self.mode = mode
        self.per_class = per_class
        self.interval = interval
        self.max_cases = max_cases
        self.output_file = Path(output_file) if output_file is not None else None
        self.records: list[dict] = []
        self._cases: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def attach(self, engine: Engine) -> None:
        if self.mode == "none":
            return
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def cases(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(image (1, 1, *S), label (1, *S))`` pairs, loaded once."""
        if self._cases is None:
            self._cases = load_cases(self.dataset, self.max_cases)
        return self._cases

    def teacher_outputs(self, device: torch.device) -> dict[str, list[torch.Tensor]]:
        """:func:`teacher_outputs` on this handler's cases."""
        return teacher_outputs(self.iteration, self.cases(), self.inferer, device)

    def _compose(self, masks, valids, temperature) -> list[torch.Tensor]:
        return compose_masks(self.iteration.teachers.generalized, masks, valids, temperature)

    @staticmethod
    def _flat(probs: list[torch.Tensor], truths: list[torch.Tensor], where: list[torch.Tensor]):
        c = probs[0].shape[1]
        p = torch.cat([x.movedim(1, -1).reshape(-1, c) for x in probs])
        t = torch.cat([x.reshape(-1) for x in truths])
        w = torch.cat([x.reshape(-1) for x in where])
        return p[:, :, None], t[:, None], w[:, None]  # (N, C, 1): the (B, C, *S) layout the metrics take

    def fit(self, device: torch.device) -> dict:
        """Fit both temperatures from the current teachers and return the record (does not set them)."""
        out = self.teacher_outputs(device)
        truths = out["truths"]
        spec_probs = [torch.softmax(x, 1) for x in out["spec_logits"]]
        near = [(t > 0) | (p.argmax(1) > 0) for t, p in zip(truths, spec_probs, strict=True)]
        gen_probs = None
        if out["masks"]:
            gen_probs = self._compose(out["masks"], out["valids"], 1.0)
            near = [n | (g.argmax(1) > 0) for n, g in zip(near, gen_probs, strict=True)]
        record: dict = {}
        p, t, w = self._flat(spec_probs, truths, near)
        logits = torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1]) for x in out["spec_logits"]])[:, :, None]

        def spec_nll(temperature: float) -> float:
            return class_nll(torch.log_softmax(logits.double() / temperature, 1), t, w)

        t_s = fit_temperature(spec_nll)
        record["specialized"] = {
            "temperature": round(t_s, 4),
            "nll": [round(spec_nll(1.0), 4), round(spec_nll(t_s), 4)],
            "ece": [round(ece(p, t, w), 4), round(ece(torch.softmax(logits / t_s, 1), t, w), 4)],
        }
        if gen_probs is not None:
            num_fg = out["masks"][0].shape[1]

            def gen_nll(temperature: float | torch.Tensor) -> float:
                probs, _, _ = self._flat(self._compose(out["masks"], out["valids"], temperature), truths, near)
                return class_nll(log_of(probs), t, w)

            t_g: float | torch.Tensor = fit_temperature(gen_nll)
            if self.per_class:  # coordinate descent from the shared value, one class at a time
                t_g = torch.full((num_fg,), float(t_g))
                for c in range(num_fg):

                    def one(temperature: float, c: int = c) -> float:
                        trial = t_g.clone()
                        trial[c] = temperature
                        return gen_nll(trial)

                    t_g[c] = fit_temperature(one)
            tempered, _, _ = self._flat(self._compose(out["masks"], out["valids"], t_g), truths, near)
            g1, _, _ = self._flat(gen_probs, truths, near)
            record["generalized"] = {
                "temperature": [round(float(v), 4) for v in t_g] if isinstance(t_g, torch.Tensor) else round(t_g, 4),
                "nll": [round(gen_nll(1.0), 4), round(gen_nll(t_g), 4)],
                "ece": [round(ece(g1, t, w), 4), round(ece(tempered, t, w), 4)],
            }
            record["_generalized_temperature"] = t_g
        record["_specialized_temperature"] = t_s
        record["voxels"] = int(w.sum())
        return record

    def __call__(self, engine: Engine) -> None:
        if self.records and self.records[-1]["iteration"] == engine.state.iteration:
            return
        self.iteration.set_temperatures(1.0, 1.0)  # the fit starts from the teachers' own outputs
        record = self.fit(getattr(engine.state, "device", None) or torch.device("cpu"))
        specialized = record.pop("_specialized_temperature")
        self.iteration.set_temperatures(specialized, record.pop("_generalized_temperature", None))
        record = {"iteration": engine.state.iteration, "epoch": engine.state.epoch, **record}
        self.records.append(record)
        engine.state.calibration = record
        if self.output_file is not None:
            append_record(self.output_file, record)
        for name in ("specialized", "generalized"):
            if name in record:
                r = record[name]
                logger.info(
                    "calibration at iteration %d: %s teacher T=%s, ECE near structures %.3f -> %.3f",
                    engine.state.iteration,
                    name,
                    r["temperature"],
                    *r["ece"],
                )
