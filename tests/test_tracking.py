"""MLflow tracking through MONAI's ``--tracking mlflow`` against a real ``mlflow server`` (SQLite backend)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CONFIGS, tiny_train_overrides
from monai.bundle import run

from custom.handlers.tracking import MLflowExtras

TRAIN, PRETRAIN, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "pretrain.json", "evaluate.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    store = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {proc.stdout.read()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pretrain_training_and_evaluation_are_tracked_in_mlflow(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    overrides = {**tiny_train_overrides(tmp_path), "tracking_uri": mlflow_server, "experiment_name": "uncol-test"}
    run("pretrain", config_file=[TRAIN, PRETRAIN], tracking="mlflow", **overrides)
    run("training", config_file=TRAIN, tracking="mlflow", **overrides)
    run("evaluate", config_file=[TRAIN, EVALUATE], tracking="mlflow", **overrides)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("uncol-test")
    runs = {r.data.params.get("stage", "evaluate"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"1", "2", "evaluate"}
    stage1, stage2, evaluation = runs["1"], runs["2"], runs["evaluate"]

    assert stage1.data.params["distillation"] == "both"
    assert {"loss_sup", "loss_visual", "loss_semantic", "train_loss", "val_mean_dice"} <= set(stage1.data.metrics)

    params = stage2.data.params
    assert params["teachers"] == "both" and params["ema_decay"] == "0.99" and params["gate"] == "entropy"
    # every setting the run used, none listed by hand: overrides, defaults, evaluated expressions
    assert params["max_epochs"] == "2" and params["threshold_ramped"] == "True" and params["ramp_iters"] == "1"
    assert params["datalist"].endswith("datalist.json") and params["roi_size"] == "[32, 32]"
    # the plan's values, given (roi_size) or derived from the data (pixdim, normalisation), and its file
    assert params["pixdim"] == "[1.0, 1.0]" and "zscore_foreground" in params["normalisation"]
    assert "pretrain_epochs" not in params  # stage 2 does not use it (stage 1 had run already)
    metrics = set(stage2.data.metrics)
    assert {"loss_sup", "loss_pseudo", "gate_kept", "gate_from_generalized", "gate_entropy_threshold"} <= metrics
    assert "gate_keep_fraction" not in metrics
    assert {"train_loss", "val_mean_dice"} <= metrics
    iterations = 2 * 2  # max_epochs x iterations_per_epoch of the tiny run
    assert len(client.get_metric_history(stage2.info.run_id, "gate_kept")) == iterations
    artifacts = {a.path for a in client.list_artifacts(stage2.info.run_id)}
    assert {"model.pt", "plan.json"} <= artifacts and any(a.startswith("config_") for a in artifacts)

    assert evaluation.data.params["split"] == "test" and evaluation.data.params["ckpt_path"].endswith("model.pt")
    assert {"test_dice", "test_hd95"} <= set(evaluation.data.metrics)
    reports = {a.path for a in client.list_artifacts(evaluation.info.run_id, "report")}
    assert "report/report.json" in reports


def test_the_logged_parameters_are_the_settings_the_configuration_resolved():
    from monai.bundle import ConfigParser

    handler = {"_target_": "custom.handlers.tracking.MLflowExtras", "params": {"stage": 2}}
    parser = ConfigParser({"lr": 0.1, "steps": "$@lr * 10", "unused": 3, "handler": {**handler, "every": "@steps"}})
    extras = parser.get_parsed_content("handler")
    assert extras.run_params() == {"lr": "0.1", "steps": "1.0", "stage": "2"}
    assert MLflowExtras(params={"split": "test"}).run_params() == {"split": "test"}  # built outside a config


def test_a_hand_made_tracking_params_list_stops_the_run_with_one_line():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {"tracking_params": "$dict(a=1)", "handler": {"_target_": "custom.handlers.tracking.MLflowExtras"}}
    )
    with pytest.raises(SystemExit, match="tracking_params is no longer read"):
        parser.get_parsed_content("handler")
