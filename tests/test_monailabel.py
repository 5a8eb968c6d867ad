"""The exported bundle serves in a real MONAI Label server (the stock ``monaibundle`` app) and its
answer over MONAI Label's HTTP API is the segmentation ``monai.bundle run inference`` writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import REPO, TINY_NET, save_student
from monai.bundle import ConfigParser, run

from scripts.make_bundle import build
from scripts.monailabel_server import prepare_app, server_command

LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bundle(tmp_path):
    """The exported bundle with a tiny student (weights saved from the bundle's own network_def)."""
    assert LABEL_PYTHON.is_file(), "MONAI Label's environment is missing: run `make label-install`"
    bundle = build(tmp_path / "dist", weights=False)
    for name in ("train.json", "inference.json"):
        path = bundle / "configs" / name
        content = json.loads(path.read_text())
        content["network_def"].update({k.split("#")[1]: v for k, v in TINY_NET.items()})
        content["roi_size"] = [32, 32]
        if name == "train.json":  # a production bundle: no embedded phantoms, a short schedule
            content.update({"use_embedded_data": False, "iterations_per_epoch": 2, "val_interval": 1})
            content.update({"num_classes": 3, "class_names": ["organ", "lesion"]})  # no datalist to read them from
        path.write_text(json.dumps(content, indent=4))
    config = bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["num_classes"] = 3  # read from model.pt once it exists
    torch.manual_seed(0)
    save_student(parser.get_parsed_content("network_def"), bundle / "models" / "model.pt")
    return bundle


def _studies_folder(tmp_path):
    """An empty MONAI Label studies folder (final labels go to ``labels/final/<image id>.nii.gz``)."""
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    return studies


def _wait_for(url: str, server: subprocess.Popen, log, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert server.poll() is None, f"MONAI Label exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"MONAI Label did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)


@contextlib.contextmanager
def _server(bundle, studies, tmp_path, strategy: bool = False, train: bool = False):
    """A MONAI Label server for ``bundle`` on a free port (stock app, or extended with UnCoL's strategy)."""
    app = prepare_app(bundle, tmp_path / "apps" / "monaibundle", python=str(LABEL_PYTHON), strategy=strategy)
    port = _free_port()
    log = tmp_path / "monailabel.log"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "MONAI_LABEL_SESSION_PATH": str(tmp_path)}
    with open(log, "w") as out:
        server = subprocess.Popen(
            server_command(app, studies, bundle.name, port, python=str(LABEL_PYTHON), train=train),
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(f"http://127.0.0.1:{port}/info/", server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_stock_monailabel_app_serves_the_bundle(tiny_dataset, tmp_path):
    bundle = _tiny_bundle(tmp_path)
    studies = tmp_path / "studies"
    studies.mkdir()
    test_image = tiny_dataset.parent / json.loads(tiny_dataset.read_text())["test"][0]["image"]
    shutil.copy(test_image, studies / "case_a.nii.gz")
    run(
        "inference",
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        input_dir=str(studies),
        output_dir=str(tmp_path / "reference"),
    )
    reference = nib.load(tmp_path / "reference" / "case_a_seg.nii.gz")

    with _server(bundle, studies, tmp_path) as base:
        with urllib.request.urlopen(f"{base}/info/", timeout=30) as response:
            info = json.load(response)
        assert info["models"][bundle.name]["labels"] == {"organ": 1, "lesion": 2}
        request = urllib.request.Request(f"{base}/infer/{bundle.name}?image=case_a&output=image", method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            (tmp_path / "served.nii.gz").write_bytes(response.read())
    served = nib.load(tmp_path / "served.nii.gz")
    labels = np.asanyarray(served.dataobj).squeeze()  # MONAI Label keeps a channel axis for 2D
    assert labels.shape == reference.shape and np.allclose(served.affine, reference.affine)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert (labels == np.asanyarray(reference.dataobj)).mean() > 0.99


def test_uncol_strategy_picks_the_unlabelled_study_the_teachers_are_least_sure_of(tiny_dataset, tmp_path):
    bundle = _tiny_bundle(tmp_path)
    studies = _studies_folder(tmp_path)
    content = json.loads(tiny_dataset.read_text())
    cases = [tiny_dataset.parent / c["image"] for c in content["unlabeled"] + content["test"]]
    for i, case in enumerate(cases):
        shutil.copy(case, studies / f"case_{i}.nii.gz")
    labelled = tiny_dataset.parent / content["test"][0]["label"]
    shutil.copy(labelled, studies / "labels" / "final" / f"case_{len(cases) - 2}.nii.gz")  # one study is done
    unlabelled = {f"case_{i}" for i in range(len(cases)) if i != len(cases) - 2}

    # the bundle's own ranking, outside MONAI Label, on the same weights and preprocessing
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "active_learning.json")])
    parser.update({"bundle_root": str(bundle), **TINY_NET, "al_checkpoint": str(bundle / "models" / "model.pt")})
    items = [{"image": str(studies / f"{name}.nii.gz")} for name in sorted(unlabelled)]
    parser.update({"al_dataset#data": items})
    ranking = parser.get_parsed_content("al_ranking")
    expected = Path(ranking[0]["image"]).name.removesuffix(".nii.gz")

    with _server(bundle, studies, tmp_path, strategy=True) as base:
        with urllib.request.urlopen(f"{base}/info/", timeout=30) as response:
            assert {"random", "first", f"{bundle.name}_uncertainty"} <= set(json.load(response)["strategies"])
        request = urllib.request.Request(f"{base}/activelearning/{bundle.name}_uncertainty", method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            picked = json.load(response)
    assert picked["id"] in unlabelled and picked["id"] == expected
    assert abs(picked["score"] - ranking[0]["score"]) < 1e-5


def test_monailabel_trains_the_bundle_on_its_labelled_studies_only(tiny_dataset, tmp_path):
    bundle = _tiny_bundle(tmp_path)
    studies = _studies_folder(tmp_path)
    content = json.loads(tiny_dataset.read_text())
    for i, case in enumerate(content["training"] + content["test"]):
        shutil.copy(tiny_dataset.parent / case["image"], studies / f"case_{i}.nii.gz")
        shutil.copy(tiny_dataset.parent / case["label"], studies / "labels" / "final" / f"case_{i}.nii.gz")
    shutil.copy(tiny_dataset.parent / content["unlabeled"][0]["image"], studies / "not_labelled_yet.nii.gz")

    with _server(bundle, studies, tmp_path, train=True) as base:
        params = json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False}).encode()
        request = urllib.request.Request(
            f"{base}/train/{bundle.name}?run_sync=true", data=params, method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=600) as response:
            assert response.status == 200
    served = tmp_path / "apps" / "monaibundle" / "model" / bundle.name
    state = torch.load(served / "models" / "stage2_last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and "ema" in state  # stage 2, MONAI Label's epoch count
    log = (tmp_path / "monailabel.log").read_text()
    assert "the 2 labelled images stand in as unlabelled" in log  # 4 labelled studies, half for validation
    assert not (served / "data").exists()  # no embedded phantoms pulled in
