"""Glue between the stages: stage 2 starts from the stage 1 checkpoint, running stage 1 if needed.

Stage 1 run from stage 2 sees exactly stage 2's configuration (every config file, every override)
with ``pretrain.json`` layered on top: it is built from the raw configuration of the parser that is
running stage 2 (:func:`custom.config.calling_config`), so no list of keys has to be kept in step.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn
from monai.bundle import ConfigParser

from custom.config import calling_config
from custom.handlers.checkpoints import ARCHITECTURE_FIELDS, TrainingRecord, read_record, student_state

logger = logging.getLogger(__name__)


def stage1_parser(stage2_config: dict, pretrain_config: str | Path) -> ConfigParser:
    """Stage 1's configuration: ``stage2_config`` with every key of ``pretrain_config`` set on top
    (the way MONAI merges a list of config files)."""
    parser = ConfigParser(copy.deepcopy(stage2_config))
    parser.update(ConfigParser.load_config_file(pretrain_config))
    return parser


def run_stage1(parser: ConfigParser, run_id: str = "pretrain") -> None:
    """Run a stage 1 configuration as ``monai.bundle run pretrain`` runs its workflow."""
    parser.parse(reset=True)
    for expr_id in ("initialize", run_id, "finalize"):
        if expr_id in parser:
            parser.get_parsed_content(expr_id)


def load_stage1(
    network: nn.Module,
    checkpoint: str | Path,
    record: TrainingRecord,
    pretrain_config: str | Path | None = None,
    same_data: bool = True,
    student_checkpoint: str | Path | None = None,
    fine_tune_from: str | Path | None = None,
) -> nn.Module:
    """Load the stage 1 student into ``network``; if ``checkpoint`` does not exist and
    ``pretrain_config`` is given, run stage 1 first (stage 2's configuration with ``pretrain_config``
    on top), otherwise stop with a message saying how to make it.

    Every checkpoint is checked against ``record`` first (:class:`TrainingRecord`): one trained for
    other data stops the run. ``fine_tune_from`` names a checkpoint to start from instead, on purpose:
    only its architecture must match, and what else differs is logged. When the labelled pairs of
    this run are not the datalist's training cases (``same_data`` False: MONAI Label hands over its
    own pairs), stage 1 is not run on other data: stage 2 fine-tunes ``student_checkpoint`` (the
    bundle's trained ``model.pt``)."""
    checkpoint = Path(checkpoint)
    if fine_tune_from is None and not same_data:
        if student_checkpoint is None or not Path(student_checkpoint).is_file():
            if not checkpoint.is_file():
                raise SystemExit(
                    f"error: {checkpoint}: no stage 1 checkpoint, and the labelled images are not the training "
                    f"cases of the datalist, so stage 1 cannot be run for them; train stage 1 first"
                )
            fine_tune_from = checkpoint
        else:
            logger.info("labelled pairs from outside the datalist: stage 2 fine-tunes the bundle's student")
            fine_tune_from = student_checkpoint
    if fine_tune_from is not None:
        fine_tune_from = Path(fine_tune_from)
        if not fine_tune_from.is_file():
            raise SystemExit(f"error: {fine_tune_from}: fine_tune_from names no file")
        record.check(fine_tune_from, ARCHITECTURE_FIELDS, "its network cannot be loaded into this one")
        other = record.differences(read_record(fine_tune_from))
        trained_for = f" (trained for: {'; '.join(other)})" if other else ""
        logger.warning(f"stage 2 fine-tunes {fine_tune_from}{trained_for}")
        network.load_state_dict(student_state(fine_tune_from), strict=True)
        return network
    if not checkpoint.is_file():
        if pretrain_config is None:
            raise SystemExit(
                f"error: {checkpoint}: no stage 1 checkpoint; run stage 1 first: python -m monai.bundle run "
                "pretrain --config_file \"['bundle/configs/train.json','bundle/configs/pretrain.json']\""
            )
        logger.info(f"no stage 1 checkpoint at {checkpoint}: running stage 1 (pretrain) first, on this configuration")
        run_stage1(stage1_parser(calling_config(), pretrain_config))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 writes the checkpoint; the others wait for it
        if not checkpoint.is_file():
            raise SystemExit(f"error: {checkpoint}: stage 1 finished without writing its checkpoint")
    record.check(checkpoint, advice=f"use a fresh --ckpt_dir, or --fine_tune_from {checkpoint} to start from it")
    network.load_state_dict(student_state(checkpoint), strict=True)
    logger.info(f"stage 2 starts from the stage 1 student {checkpoint}")
    return network
