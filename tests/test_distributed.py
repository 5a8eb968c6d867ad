"""Multi-process data-parallel training: gradient averaging, and the bundle's multi_gpu_train.json
under ``torchrun --nproc_per_node 2`` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS, tiny_train_overrides


def _average_worker(rank: int, world: int, port: int, out) -> None:
    from custom.handlers.distributed import AverageGradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different weights per rank: the broadcast must make them equal
    net = torch.nn.Linear(3, 2)
    unused = torch.nn.Linear(2, 2)  # no gradient on any rank: must not break the reduction
    optimizer = torch.optim.SGD([*net.parameters(), *unused.parameters()], lr=0.1)
    sync = AverageGradients(optimizer, [net, unused])
    sync.broadcast()
    x = torch.full((1, 3), float(rank + 1))
    net(x).sum().backward()  # d/dW = x: rank 0 gives ones, rank 1 twos
    sync()
    out[rank] = (net.weight.detach().clone(), net.weight.grad.clone(), unused.weight.grad.clone())
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradients_are_averaged_over_processes():
    port = _free_port()
    out = mp.Manager().dict()
    mp.spawn(_average_worker, args=(2, port, out), nprocs=2, join=True)
    (w0, g0, u0), (w1, g1, u1) = out[0], out[1]
    assert torch.equal(w0, w1)  # both start from rank 0's weights
    assert torch.allclose(g0, torch.full((2, 3), 1.5)) and torch.equal(g0, g1)  # mean of 1 and 2
    assert torch.equal(u0, torch.zeros(2, 2)) and torch.equal(u1, u0)


def torchrun_training(root, configs: list[str]) -> subprocess.CompletedProcess:
    """``monai.bundle run training`` under ``torchrun --nproc_per_node 2`` (gloo on CPU), tiny sizes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs)]  # fmt: skip
    for key, value in tiny_train_overrides(root).items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rank_states_config(folder, without_gradient_sync: bool = False) -> str:
    """A config layered last: after stage 2, every rank saves its student and EMA weights (train.json's
    own ``run`` list, plus one step); optionally the gradient averaging is left out."""
    run = json.loads((CONFIGS / "train.json").read_text())["run"]
    save = "$torch.save({'student': @network.state_dict(), 'ema': @ema.ema_model.state_dict()}, "
    save += "@output_dir + '/rank' + str(dist.get_rank()) + '.pt')"
    config = {"run": [*run, save]}
    if without_gradient_sync:
        config["train#trainer#train_handlers"] = "@rank_train_handlers"
    path = folder / "rank_states.json"
    path.write_text(json.dumps(config))
    return str(path)


def rank_states(root) -> list[dict[str, dict[str, torch.Tensor]]]:
    return [torch.load(root / "eval" / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multi_gpu_config_trains_both_stages_under_torchrun_on_cpu(tmp_path):
    synced = tmp_path / "synced"
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")]
    proc = torchrun_training(synced, [*configs, rank_states_config(tmp_path)])
    log = proc.stdout + proc.stderr
    assert "running stage 1 (pretrain) first" in log  # stage 1 ran distributed too
    for name in ("pretrain.pt", "model.pt", "stage2_last.pt"):
        assert (synced / "models" / name).is_file(), name
    state = torch.load(synced / "models" / "stage2_last.pt", map_location="cpu", weights_only=True)
    # each rank drew iterations_per_epoch batches per epoch from its own shard: 2 epochs x 2 iterations
    assert state["trainer"]["iteration"] == 4
    # averaged gradients: both ranks end with the same student and the same EMA teacher
    rank0, rank1 = rank_states(synced)
    assert same_weights(rank0["student"], rank1["student"]) and same_weights(rank0["ema"], rank1["ema"])

    # the same stage 2 from the same stage 1 without the averaging: each rank trains alone on its half of
    # the data, so the ranks part ways (the check above can fail), and neither is the averaged run
    alone = tmp_path / "alone"
    (alone / "models").mkdir(parents=True)
    shutil.copy(synced / "models" / "pretrain.pt", alone / "models" / "pretrain.pt")
    torchrun_training(alone, [*configs, rank_states_config(tmp_path, without_gradient_sync=True)])
    alone0, alone1 = rank_states(alone)
    assert not same_weights(alone0["student"], alone1["student"])
    assert not same_weights(alone0["ema"], alone1["ema"])
    assert not same_weights(alone0["student"], rank0["student"])
