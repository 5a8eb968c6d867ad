"""Glue between the stages: stage 2 starts from the stage 1 checkpoint, running stage 1 if needed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def load_stage1(
    network: nn.Module,
    checkpoint: str | Path,
    pretrain_configs: Sequence[str] | None = None,
    overrides: dict | None = None,
    labelled: list[dict] | None = None,
    datalist: str | Path | None = None,
    student_checkpoint: str | Path | None = None,
) -> nn.Module:
    """Load the stage 1 student into ``network``. If ``checkpoint`` does not exist and
    ``pretrain_configs`` is given, run stage 1 (``monai.bundle run pretrain``) with ``overrides``
    first; otherwise stop with a message saying how to make it.

    Stage 1 runs on ``datalist``; when the ``labelled`` pairs of this run are not its training cases
    (MONAI Label hands over its own pairs), stage 1 is not run on other data: stage 2 starts from
    ``student_checkpoint`` (the bundle's trained ``model.pt``) instead."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file() and labelled is not None and datalist is not None:
        from custom.data.datalist import lists_as_training

        if not lists_as_training(datalist, labelled):
            if student_checkpoint is None or not Path(student_checkpoint).is_file():
                raise SystemExit(
                    f"error: {checkpoint}: no stage 1 checkpoint, and the labelled images are not the training "
                    f"cases of {datalist}, so stage 1 cannot be run for them; train stage 1 first"
                )
            logger.info(f"no stage 1 checkpoint and labelled pairs from outside {datalist}: starting from the student")
            checkpoint = Path(student_checkpoint)
    if not checkpoint.is_file():
        if pretrain_configs is None:
            raise SystemExit(
                f"error: {checkpoint}: no stage 1 checkpoint; run stage 1 first: python -m monai.bundle run "
                "pretrain --config_file \"['bundle/configs/train.json','bundle/configs/pretrain.json']\""
            )
        from monai.bundle import run

        logger.info(f"no stage 1 checkpoint at {checkpoint}: running stage 1 (pretrain) first")
        run("pretrain", config_file=list(pretrain_configs), **(overrides or {}))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 writes the checkpoint; the others wait for it
        if not checkpoint.is_file():
            raise SystemExit(f"error: {checkpoint}: stage 1 finished without writing its checkpoint")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    logger.info(f"stage 2 starts from the stage 1 student {checkpoint}")
    return network
