"""Data-parallel distillation: two gloo processes give the gradient of one process on the joint batch.

BatchNorm makes this subtle: in training mode every process normalises with the statistics of its
own part of the batch, so the two halves see different normalisations than the joint batch does
(SyncBatchNorm would fix that but does not exist for gloo/CPU). The check therefore runs the
network with BatchNorm in eval mode (running statistics: every voxel's output depends only on its
own scene). Everything else is exact: scenes never interact in a sparse convolution (the batch index
is a coordinate), and the trainer divides each loss term by its count over the joint batch
(all-reduced), so DDP's gradient average equals the joint-batch gradient. The check includes the
TESD terms (each process keeps the history of its own scenes).
"""

import os
import time
from datetime import timedelta
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config, tiny_scenes  # noqa: E402

NAMES = ["a", "b", "c"]


def _gradients(distiller, indices, tesd: bool):
    """Gradient of the loss on scenes ``indices`` with BatchNorm in eval mode."""
    from sas_core.train.distill import forward_features  # noqa: F401  (imported for clarity)

    distiller.model.eval()
    if tesd:
        distiller.initialize_tesd()
    distiller.optimizer.zero_grad()
    res = distiller.losses(distiller.batch(indices, epoch=0), epoch=0, step=0, tesd=tesd)
    res["loss"].backward()
    return {k: p.grad.detach().clone() for k, p in distiller.model.named_parameters() if p.grad is not None}


def _worker(rank, world, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # file rendezvous: no port to pick and release before use (another process could take it)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        from sas_core.train.distill import Distiller

        scenes, text = tiny_scenes(2, n_points=200)
        d = Distiller(tiny_config(Path(out_dir) / "ddp", batch_size=1), scenes, text, NAMES)
        assert d.world == 2 and d.rank == rank
        # static shard: scene i -> rank i % world; stage-1 losses, then with the TESD terms
        grads = {tesd: _gradients(d, [rank], tesd) for tesd in (False, True)}
        if rank == 0:
            torch.save(grads, Path(out_dir) / "grads_ddp.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_on_the_joint_batch(tmp_path):
    from sas_core.train.distill import Distiller

    ctx = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP workers did not finish within 300 s")
    ddp = torch.load(tmp_path / "grads_ddp.pt", weights_only=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scenes, text = tiny_scenes(2, n_points=200)
        single = Distiller(tiny_config(tmp_path / "one", batch_size=2), scenes, text, NAMES)
        ref = {tesd: _gradients(single, [0, 1], tesd) for tesd in (False, True)}
        half = _gradients(Distiller(tiny_config(tmp_path / "half", batch_size=1), scenes, text, NAMES), [0], False)
    finally:
        torch.set_num_threads(n)

    def worst(a, b):
        return max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)

    for tesd in (False, True):
        assert ref[tesd].keys() == ddp[tesd].keys() and len(ref[tesd]) > 10
        assert worst(ref[tesd], ddp[tesd]) < 1e-4, (tesd, worst(ref[tesd], ddp[tesd]))
    assert worst(ref[True], ref[False]) > 1e-3  # the TESD terms do contribute
    assert worst(ref[False], half) > 1e-3  # the check can fail: one process's half is not the joint batch
