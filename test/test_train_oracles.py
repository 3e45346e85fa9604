"""Distillation losses and temporal ensembling against values worked out by hand, on fixtures that
tell the plausible wrong variants apart: superpoints of different sizes, 2D targets that vary
inside a superpoint, an asymmetric EMA constant."""

import math

import pytest
import torch

from sas_core.train.losses import point_loss, superpoint_distillation_loss, tesd_loss
from sas_core.train.tesd import TemporalEnsemble

# superpoint A = points 0, 1, 2 (2D targets differ inside it), superpoint B = point 3 alone
F2D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
F3D = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
SEG = torch.tensor([7, 7, 7, 2])  # arbitrary, non-contiguous ids

C45 = 1 - 1 / math.sqrt(2)          # 1 - cos 45 degrees
# superpoint A: 2D mean (2/3, 2/3), 3D mean (2/3, 1/3): cos = (6/9) / (sqrt(8)/3 * sqrt(5)/3) = 6 / sqrt(40)
SP_A = 1 - 6 / math.sqrt(40)


def test_point_term_uses_the_superpoint_mean_of_the_2d_targets():
    lp, _ = superpoint_distillation_loss(F3D, F2D, SEG)
    # every point of A against (1, 1)/sqrt(2): C45 three times; point 3: (0, 1) vs (1, 0) -> 1
    assert lp.item() == pytest.approx((3 * C45 + 1) / 4, abs=1e-6)
    # the variant against the raw 2D features gives (0 + 1 + C45 + 1) / 4: far from the above
    assert abs(lp.item() - point_loss(F3D, F2D).item()) > 0.1


def test_superpoint_term_is_a_mean_over_superpoints_not_points():
    _, lsp = superpoint_distillation_loss(F3D, F2D, SEG)
    assert lsp.item() == pytest.approx((SP_A + 1) / 2, abs=1e-6)
    # averaged per point it would be (3 * SP_A + 1) / 4
    assert abs(lsp.item() - (3 * SP_A + 1) / 4) > 0.1
    (s_p, n_p), (s_sp, n_sp) = superpoint_distillation_loss(F3D, F2D, SEG, reduction="sum")
    assert (n_p, n_sp) == (4, 2)
    assert s_sp.item() == pytest.approx(SP_A + 1, abs=1e-6)


def test_tesd_superpoint_cross_entropy_uses_the_superpoint_mean_of_the_outputs():
    text = torch.eye(2)
    _, lsp = tesd_loss(F3D, SEG, torch.zeros(4, dtype=torch.long), torch.tensor([1, 0]), text, temperature=1.0)
    # contiguous ids in sorted order: id 2 (point 3) -> 0, id 7 (superpoint A) -> 1
    # B: mean (0, 1), label 1 -> CE = log(1 + e^-1); A: mean (2/3, 1/3) normalised, label 0
    a = torch.tensor([2 / 3, 1 / 3]) / math.sqrt(5 / 9)
    ce_a = math.log(math.exp(a[0]) + math.exp(a[1])) - a[0].item()
    assert lsp.item() == pytest.approx((math.log(1 + math.exp(-1)) + ce_a) / 2, abs=1e-5)


def test_temporal_ensemble_keeps_alpha_of_the_history():
    """F_hat = alpha F_hat + (1 - alpha) F with alpha = 0.9: two updates by hand."""
    ens = TemporalEnsemble(alpha=0.9)
    h0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ens.initialize("s", h0)
    f1 = torch.tensor([[0.0, 1.0], [4.0, 0.0]])
    f2 = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    ens.update("s", f1)
    out = ens.update("s", f2[1:], index=torch.tensor([1]))
    h1 = 0.9 * h0 + 0.1 * f1
    want = h1.clone()
    want[1] = 0.9 * h1[1] + 0.1 * f2[1]
    assert torch.allclose(out, want[1:], atol=2e-3)
    assert torch.allclose(ens.get("s").float(), want, atol=2e-3)  # fp16 history
    # the swapped constant would give 0.1 * h0 + 0.9 * f1 for row 0
    assert not torch.allclose(ens.get("s")[0].float(), 0.1 * h0[0] + 0.9 * f1[0], atol=0.1)


def test_distiller_uses_the_configured_alpha(tmp_path):
    from sas_core.train.distill import DistillConfig, Distiller
    from sas_core.train.datasets import scene_from_arrays
    import numpy as np

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 2, (64, 3)).astype(np.float32)
    scene = scene_from_arrays("s", p, rng.normal(size=(64, 4)).astype(np.float32), np.ones(64, bool),
                              np.zeros(64, np.int64), np.zeros(64, np.int64))
    cfg = DistillConfig(arch="MinkUNet14A", epochs=2, voxel_size=0.5, out_dir=str(tmp_path), progress=False,
                        val_every=0, tesd_alpha=0.8)
    text = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    d = Distiller(cfg, [scene], text, ["a", "b"])
    assert d.tesd.alpha == pytest.approx(0.8)


def test_point_loss_accepts_mixed_precision_targets():
    """bf16 / fp64 network outputs against fp32 targets (mixed precision): the targets follow the
    output's dtype, the value is the plain cosine distance."""
    f3d = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    f2d = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float32)
    loss = point_loss(f3d, f2d)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2, abs=1e-9)
    with pytest.raises(ValueError, match=r"3D features \(2, 2\) and 2D targets \(1, 2\) differ"):
        point_loss(f3d, f2d[:1])


def test_temporal_ensembles_of_ranks_merge_and_count_fp16_bytes(tmp_path):
    a, b = TemporalEnsemble(alpha=0.9), TemporalEnsemble(alpha=0.9, offload_dir=str(tmp_path))
    a.update("s0", torch.ones(4, 3))
    b.update("s1", torch.full((2, 3), 2.0))
    b.update("s0", torch.zeros(4, 3))
    a.merge(b.state_dict())  # the other rank's scenes win where both have one (gathered state)
    assert sorted(a.scenes()) == ["s0", "s1"]
    assert torch.equal(a.get("s1"), torch.full((2, 3), 2.0, dtype=torch.float16))
    assert torch.equal(a.get("s0"), torch.zeros(4, 3, dtype=torch.float16))
    assert a.nbytes() == (4 * 3 + 2 * 3) * 2 and b.nbytes() == a.nbytes()
