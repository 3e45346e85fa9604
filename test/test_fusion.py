"""Capability-guided fusion (SAS eq. 6-8) and its baselines, checked against hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from sas_core.fusion import (
    FeatureFuser,
    FusionConfig,
    add_fusion,
    capability_fusion,
    capability_weights,
    fuse,
    fused_mask,
    linear_fusion,
)

TEXT = torch.eye(3)  # class k's text embedding is the k-th unit vector


def test_two_teachers_by_hand():
    fa = torch.tensor([[0.9, 0.1, 0.0]])  # teacher A predicts class 0
    fb = torch.tensor([[0.2, 0.8, 0.0]])  # teacher B predicts class 1
    S = torch.tensor([[0.8, 0.3, 0.5], [0.4, 0.6, 0.2]])
    # eq. 7: w_A = (S_A[0] + S_A[1]) / 2 = 0.55, w_B = (S_B[0] + S_B[1]) / 2 = 0.5
    ea, eb = math.exp(0.55 / 0.05), math.exp(0.5 / 0.05)
    a, b = ea / (ea + eb), eb / (ea + eb)  # eq. 8
    expected = [a * 0.9 + b * 0.2, a * 0.1 + b * 0.8, 0.0]
    out, w = capability_fusion([fa, fb], TEXT, S, tau=0.05, return_weights=True)
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w[:, 0].numpy(), [a, b], rtol=1e-5)
    assert abs(a - 0.7310586) < 1e-6  # sanity on the hand computation itself


def test_two_teachers_agreeing_weights_by_capability_of_that_class():
    # both predict class 2: w_A = S_A[2] = 0.5, w_B = S_B[2] = 0.2
    fa = torch.tensor([[0.0, 0.1, 0.7]])
    fb = torch.tensor([[0.3, 0.0, 0.9]])
    S = torch.tensor([[0.8, 0.3, 0.5], [0.4, 0.6, 0.2]])
    ea, eb = math.exp(0.5 / 0.05), math.exp(0.2 / 0.05)
    a, b = ea / (ea + eb), eb / (ea + eb)
    out = capability_fusion([fa, fb], TEXT, S)
    np.testing.assert_allclose(out[0].numpy(), [b * 0.3, a * 0.1, a * 0.7 + b * 0.9], rtol=1e-5, atol=1e-7)


def test_three_teachers_by_hand_and_temperature():
    f = [torch.tensor([[1.0, 0.2, 0.1]]), torch.tensor([[0.1, 1.0, 0.3]]), torch.tensor([[0.0, 0.2, 0.5]])]
    S = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.6, 0.3], [0.5, 0.5, 0.8]])
    # predictions 0, 1, 2 -> w_t = mean of row t = 0.4, 0.4, 0.6
    for tau in (0.05, 0.5):
        e = [math.exp(0.4 / tau), math.exp(0.4 / tau), math.exp(0.6 / tau)]
        z = sum(e)
        wt = [v / z for v in e]
        expected = [sum(wt[t] * float(f[t][0, c]) for t in range(3)) for c in range(3)]
        out, w = capability_fusion(f, TEXT, S, tau=tau, return_weights=True)
        np.testing.assert_allclose(w[:, 0].numpy(), wt, rtol=1e-5)
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5)
    # several points at once, in a different order: each point is independent
    stacked = [torch.cat([x, x.flip(-1)]) for x in f]
    out = capability_fusion(stacked, TEXT, S)
    single = capability_fusion([x.flip(-1) for x in f], TEXT, S)
    np.testing.assert_allclose(out[1].numpy(), single[0].numpy(), rtol=1e-6)


def test_public_code_weight_normalisation_variant():
    fa = torch.tensor([[0.9, 0.1, 0.0]])
    fb = torch.tensor([[0.2, 0.8, 0.0]])
    S = torch.tensor([[0.8, 0.3, 0.5], [0.4, 0.6, 0.2]])
    la, lb = 0.8 + 0.3, 0.4 + 0.6  # summed capabilities, then divided by their total
    ea, eb = math.exp(la / (la + lb) / 0.05), math.exp(lb / (la + lb) / 0.05)
    _, w = capability_fusion([fa, fb], TEXT, S, weight_norm="sum", return_weights=True)
    np.testing.assert_allclose(w[:, 0].numpy(), [ea / (ea + eb), eb / (ea + eb)], rtol=1e-5)


def test_masks_remove_votes_and_weights():
    f = [torch.tensor([[1.0, 0.2, 0.1], [0.5, 0.0, 0.0]]),
         torch.tensor([[0.1, 1.0, 0.3], [0.0, 0.0, 0.0]]),
         torch.tensor([[0.0, 0.2, 0.5], [0.0, 0.0, 0.0]])]
    S = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.6, 0.3], [0.5, 0.5, 0.8]])
    masks = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, False])]
    # point 0: only A (pred 0) and B (pred 1) vote: w_A = (0.9+0.1)/2 = 0.5, w_B = (0.3+0.6)/2 = 0.45
    ea, eb = math.exp(0.5 / 0.05), math.exp(0.45 / 0.05)
    a, b = ea / (ea + eb), eb / (ea + eb)
    out, w = capability_fusion(f, TEXT, S, masks=masks, return_weights=True)
    np.testing.assert_allclose(w[:, 0].numpy(), [a, b, 0.0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[0].numpy(), [a * 1.0 + b * 0.1, a * 0.2 + b * 1.0, a * 0.1 + b * 0.3], rtol=1e-5)
    # point 1: only A valid -> its feature unchanged
    np.testing.assert_allclose(out[1].numpy(), [0.5, 0.0, 0.0])
    # nobody valid -> zero and not in the fused mask
    masks2 = [torch.tensor([True, False])] * 3
    out2 = capability_fusion(f, TEXT, S, masks=masks2)
    assert torch.all(out2[1] == 0)
    assert fused_mask(masks2).tolist() == [True, False]


def test_add_and_linear_by_hand():
    fa = torch.tensor([[0.6, 0.8, 0.0]])  # best cosine to a class text: 0.8
    fb = torch.tensor([[0.0, 0.0, 2.0]])  # best cosine 1.0 (norm does not matter for the weight)
    np.testing.assert_allclose(add_fusion([fa, fb])[0].numpy(), [0.6, 0.8, 2.0])
    np.testing.assert_allclose(add_fusion([fa, fb], reduce="mean")[0].numpy(), [0.3, 0.4, 1.0])
    wa, wb = 0.8 / 1.8, 1.0 / 1.8
    np.testing.assert_allclose(linear_fusion([fa, fb], TEXT)[0].numpy(), [wa * 0.6, wa * 0.8, wb * 2.0], rtol=1e-6)
    # masks: B missing -> add and linear give A alone
    m = [torch.tensor([True]), torch.tensor([False])]
    np.testing.assert_allclose(add_fusion([fa, fb], m)[0].numpy(), [0.6, 0.8, 0.0])
    np.testing.assert_allclose(linear_fusion([fa, fb], TEXT, m)[0].numpy(), [0.6, 0.8, 0.0], rtol=1e-6)


def test_capability_picks_the_capable_teacher_where_baselines_cannot():
    # A is good at class 0 and bad at class 1; B the opposite. On a point that is truly class 0, A says
    # 0 (confidently small), B wrongly says 1 (with a larger feature). Add/linear follow B, capability A.
    fa = torch.tensor([[0.55, 0.45, 0.0]])
    fb = torch.tensor([[0.05, 0.95, 0.0]])
    S = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.5]])
    assert int(fuse([fa, fb], TEXT, S, config=FusionConfig("capability")).argmax()) == 0
    assert int(fuse([fa, fb], TEXT, S, config=FusionConfig("add")).argmax()) == 1
    assert int(fuse([fa, fb], TEXT, S, config=FusionConfig("linear")).argmax()) == 1


def test_chunked_streaming_normalisation_and_dtype():
    g = torch.Generator().manual_seed(0)
    n, c, k = 1000, 16, 5
    f = [torch.randn(n, c, generator=g).half() for _ in range(3)]
    m = [torch.rand(n, generator=g) > 0.3 for _ in range(3)]
    text = torch.nn.functional.normalize(torch.randn(k, c, generator=g), dim=-1)
    S = torch.rand(3, k, generator=g)
    full = capability_fusion(f, text, S, masks=m, chunk_size=0)
    chunked = capability_fusion(f, text, S, masks=m, chunk_size=97)
    assert full.dtype == torch.float16 and full.shape == (n, c)
    assert torch.equal(full, chunked)
    fuser = FeatureFuser(text, S, FusionConfig(chunk_size=0))
    parts = list(fuser.stream(([x[s:s + 300] for x in f], [y[s:s + 300] for y in m]) for s in range(0, n, 300)))
    assert torch.equal(torch.cat(parts), full)
    normed = capability_fusion(f, text, S, masks=m, normalize_output=True).float()
    covered = fused_mask(m)
    np.testing.assert_allclose(normed[covered].norm(dim=-1).numpy(), 1.0, atol=2e-3)
    # numpy inputs work too
    out_np = capability_fusion([x.numpy() for x in f], text.numpy(), S.numpy(), masks=[y.numpy() for y in m])
    assert torch.equal(out_np, full)


def test_bad_input_errors():
    f = [torch.zeros(4, 3), torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="shape"):
        capability_fusion([torch.zeros(4, 3), torch.zeros(5, 3)], TEXT, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="capability"):
        capability_fusion(f, TEXT, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        capability_fusion(f, TEXT, torch.tensor([[0.1, float("nan"), 0.2], [0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match="text"):
        capability_fusion(f, torch.eye(4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        add_fusion(f, [torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError):
        FusionConfig(method="max")
    with pytest.raises(ValueError):
        capability_weights(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3), weight_norm="median")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(500, 8, generator=g) for _ in range(2)]
    text = torch.randn(4, 8, generator=g)
    S = torch.rand(2, 4, generator=g)
    cpu = capability_fusion(f, text, S)
    gpu = capability_fusion([x.cuda() for x in f], text.cuda(), S.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
