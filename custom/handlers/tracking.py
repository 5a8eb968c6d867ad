"""What UnCoL adds to the MLflow run that ``monai.bundle run ... --tracking mlflow`` opens.

MONAI's own tracking handler logs the total loss, the engine's metrics and the executed config. This
handler joins the same run and adds what a user of UnCoL watches: every loss term and the gate
statistics per iteration, the run's settings once, and files (best checkpoint, result reports) as
artifacts at the end. Without ``--tracking`` it finds no MLflow handler on the engine and does nothing.

The settings are not listed anywhere: they are every top-level setting of the configuration the
handler was built from that the run resolved to a plain value (:func:`custom.config.plain_settings`),
overrides included, so a setting added to a config file is logged as soon as a component uses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from custom.config import calling_parser, plain_settings

logger = logging.getLogger(__name__)

#: MLflow takes at most this many parameters in one ``log_batch`` call
PARAMS_PER_BATCH = 100


def find_mlflow_handler(engine: Engine):
    """The MONAI ``MLFlowHandler`` attached to ``engine`` (by ``--tracking mlflow``), or None."""
    from monai.handlers import MLFlowHandler

    for handlers in getattr(engine, "_event_handlers", {}).values():
        for entry in handlers:
            owner = getattr(entry[0], "__self__", None)
            if isinstance(owner, MLFlowHandler):
                return owner
    return None


class MLflowExtras:
    """Log extra scalars, parameters and artifacts into the engine's MLflow run, when there is one.

    Args:
        output_transform: engine output -> ``{name: float}`` logged every ``every`` iterations.
        params: parameters logged once, at the first iteration, besides the settings (e.g. ``{"stage": 2}``).
        artifacts: files or folders logged when the engine completes (missing ones are skipped).
        every: iterations between scalar logs.
        settings: also log the settings of the configuration this handler is built from (see the
            module docstring); nothing when it is not built from one.
    """

    def __init__(
        self,
        output_transform: Callable | None = None,
        params: dict | None = None,
        artifacts: Sequence[str | Path] = (),
        every: int = 1,
        settings: bool = True,
    ) -> None:
        self.output_transform = output_transform
        self.params = params or {}
        self.artifacts = [Path(a) for a in artifacts]
        self.every = every
        self._parser = calling_parser() if settings else None
        if self._parser is not None and "tracking_params" in self._parser:
            raise SystemExit(
                "error: tracking_params is no longer read: every plain top-level setting is logged; give any "
                "other parameter to custom.handlers.tracking.MLflowExtras as params"
            )
        self._tracker = None
        self._params_logged = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _run(self, engine: Engine):
        """``(client, run_id)`` of the active run, once MONAI's handler has started it."""
        if self._tracker is None:
            self._tracker = find_mlflow_handler(engine) or False
        run = getattr(self._tracker, "cur_run", None) if self._tracker else None
        return (self._tracker.client, run.info.run_id) if run is not None else (None, None)

    def run_params(self) -> dict[str, str]:
        """What is logged once: the configuration's plain settings, then ``params``."""
        settings = plain_settings(self._parser) if self._parser is not None else {}
        return {**settings, **{k: str(v) for k, v in self.params.items()}}

    def iteration_completed(self, engine: Engine) -> None:
        client, run_id = self._run(engine)
        if client is None:
            return
        if not self._params_logged:
            from mlflow.entities import Param

            existing = client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in self.run_params().items() if k not in existing]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])
            self._params_logged = True
        if self.output_transform is None or engine.state.iteration % self.every:
            return
        from mlflow.entities import Metric

        values = self.output_transform(engine.state.output) or {}
        stamp = int(1000 * time.time())
        metrics = [
            Metric(k, float(v.item() if isinstance(v, torch.Tensor) else v), stamp, engine.state.iteration)
            for k, v in values.items()
        ]
        client.log_batch(run_id, metrics=metrics)

    def completed(self, engine: Engine) -> None:
        client, run_id = self._run(engine)
        if client is None:
            return
        for path in self.artifacts:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                client.log_artifact(run_id, str(path))
            else:
                logger.warning(f"MLflow artifact {path} does not exist; not logged")
