"""Capability-guided fusion (SAS eq. 6-8) and its baselines against per-point loop oracles written
from the paper's equations, over every option (weight_norm, normalisation, masks, chunks, dtypes,
empty inputs). Written to kill the mutants that survived the older tests (`make mutate`)."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core.fusion import (FusionConfig, add_fusion, capability_fusion, capability_weights, fuse,  # noqa: E402
                             linear_fusion, linear_weights)

EPS = 1e-12


def _unit(v):
    return v / max(np.linalg.norm(v), EPS)


def _inputs(seed=0, T=3, N=41, C=6, K=5):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(T, N, C)) * rng.uniform(0.2, 3.0, size=(T, N, 1))  # norms differ a lot
    M = rng.random((T, N)) > 0.25
    M[:, 0] = False  # a point no teacher sees
    M[:, 1] = [True] + [False] * (T - 1)  # a point one teacher sees
    F[~M] = np.nan  # invalid teachers may hold garbage; it must not leak
    text = rng.normal(size=(K, C))
    S = rng.uniform(0.05, 0.9, size=(T, K))
    return F, M, text, S


def _prep(F, normalize):
    X = np.nan_to_num(F, nan=0.0)
    if normalize:
        X = np.stack([[_unit(v) for v in row] for row in X])
    return X


def capability_oracle(F, M, text, S, tau=0.05, weight_norm="mean", normalize_inputs=False,
                      normalize_output=False):
    T, N, C = F.shape
    X = _prep(F, normalize_inputs)
    out, W = np.zeros((N, C)), np.zeros((T, N))
    for n in range(N):
        valid = [t for t in range(T) if M[t, n]]
        if not valid:
            continue
        pred = {u: int(np.argmax(text @ X[u, n])) for u in valid}             # eq. 6
        w = {t: np.mean([S[t, pred[u]] for u in valid]) for t in valid}       # eq. 7
        if weight_norm == "sum":
            total = sum(w.values())
            w = {t: w[t] / max(total, EPS) for t in valid}
        z = np.array([w[t] / tau for t in valid])
        e = np.exp(z - z.max())
        for t, p in zip(valid, e / e.sum()):                                  # eq. 8
            W[t, n] = p
        out[n] = sum(W[t, n] * X[t, n] for t in valid)
        if normalize_output:
            out[n] = _unit(out[n])
    return out, W


def add_oracle(F, M, reduce="sum", normalize_inputs=False, normalize_output=False):
    T, N, C = F.shape
    X = _prep(F, normalize_inputs)
    out = np.zeros((N, C))
    for n in range(N):
        valid = [t for t in range(T) if M[t, n]]
        if not valid:
            continue
        out[n] = sum(X[t, n] for t in valid) / (len(valid) if reduce == "mean" else 1)
        if normalize_output:
            out[n] = _unit(out[n])
    return out


def linear_oracle(F, M, text, normalize_inputs=False, normalize_output=False):
    T, N, C = F.shape
    X = _prep(F, normalize_inputs)
    out, W = np.zeros((N, C)), np.zeros((T, N))
    tn = np.stack([_unit(t) for t in text])
    for n in range(N):
        valid = [t for t in range(T) if M[t, n]]
        if not valid:
            continue
        sims = {t: max(0.0, float(np.max(tn @ _unit(X[t, n])))) for t in valid}
        total = sum(sims.values())
        for t in valid:
            W[t, n] = sims[t] / total if total > 0 else 1.0 / len(valid)
        out[n] = sum(W[t, n] * X[t, n] for t in valid)
        if normalize_output:
            out[n] = _unit(out[n])
    return out, W


def _t(F, M):
    return [torch.from_numpy(f.astype(np.float32)) for f in F], [torch.from_numpy(m) for m in M]


@pytest.mark.parametrize("weight_norm,ni,no", list(itertools.product(("mean", "sum"), (False, True), (False, True))))
def test_capability_fusion_matches_the_equations(weight_norm, ni, no):
    F, M, text, S = _inputs()
    feats, masks = _t(F, M)
    for tau in (0.05, 0.3):
        want, want_w = capability_oracle(F, M, text, S, tau, weight_norm, ni, no)
        got, got_w = capability_fusion(feats, torch.from_numpy(text).float(), torch.from_numpy(S).float(), tau, masks,
                                       weight_norm=weight_norm, normalize_inputs=ni, normalize_output=no,
                                       chunk_size=7, return_weights=True)
        np.testing.assert_allclose(got_w.numpy(), want_w, atol=1e-5)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
        assert not np.isnan(got.numpy()).any()


def test_capability_defaults_are_the_papers():
    F, M, text, S = _inputs(seed=1)
    feats, masks = _t(F, M)
    want, _ = capability_oracle(F, M, text, S)  # tau 0.05, eq. 7 mean, no normalisation
    got = capability_fusion(feats, torch.from_numpy(text).float(), torch.from_numpy(S).float(), masks=masks)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    preds = torch.from_numpy(np.stack([np.argmax(_prep(F, False)[t] @ text.T, axis=1) for t in range(len(F))]))
    _, want_w = capability_oracle(F, M, text, S)
    np.testing.assert_allclose(capability_weights(preds, torch.from_numpy(S), torch.from_numpy(M)).numpy(), want_w,
                               atol=1e-5)
    np.testing.assert_allclose(fuse(feats, torch.from_numpy(text).float(), torch.from_numpy(S).float(), masks).numpy(),
                               want, atol=1e-4)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be positive"):
            capability_fusion(feats, torch.from_numpy(text).float(), torch.from_numpy(S).float(), tau, masks)


def test_capability_weights_with_one_voter_and_small_totals():
    # one valid teacher votes: the mean over voters divides by 1, not by a floor of 2
    preds = torch.tensor([[0], [1]])
    cap = torch.tensor([[0.4, 0.2], [0.1, 0.3]])
    w = capability_weights(preds, cap, torch.tensor([[True], [True]]), tau=1.0)
    m = np.array([(0.4 + 0.2) / 2, (0.1 + 0.3) / 2])  # each teacher's capability on both votes
    np.testing.assert_allclose(w[:, 0].numpy(), np.exp(m) / np.exp(m).sum(), atol=1e-6)
    w = capability_weights(preds, cap, torch.tensor([[True], [False]]), tau=1.0)
    np.testing.assert_allclose(w[:, 0].numpy(), [1.0, 0.0])
    # weight_norm "sum" divides by totals far below 1
    small = cap * 1e-3
    w = capability_weights(preds, small, tau=0.05, weight_norm="sum")
    ws = np.array([0.3e-3, 0.2e-3]) / 0.5e-3
    np.testing.assert_allclose(w[:, 0].numpy(), np.exp(ws / 0.05) / np.exp(ws / 0.05).sum(), atol=1e-5)
    with pytest.raises(ValueError, match="weight_norm must be 'mean' or 'sum'"):
        capability_weights(preds, cap, weight_norm="max")


@pytest.mark.parametrize("reduce,ni,no", list(itertools.product(("sum", "mean"), (False, True), (False, True))))
def test_add_fusion_matches_the_sum(reduce, ni, no):
    F, M, _, _ = _inputs(seed=2)
    feats, masks = _t(F, M)
    got = add_fusion(feats, masks, reduce=reduce, normalize_inputs=ni, normalize_output=no, chunk_size=5)
    np.testing.assert_allclose(got.numpy(), add_oracle(F, M, reduce, ni, no), atol=1e-4)
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'mean'"):
        add_fusion(feats, masks, reduce="max")


@pytest.mark.parametrize("ni,no", list(itertools.product((False, True), (False, True))))
def test_linear_fusion_matches_its_weights(ni, no):
    F, M, text, _ = _inputs(seed=3)
    # every teacher's feature at point 2 points away from all texts: no positive similarity
    F[:, 2] = -(text / np.linalg.norm(text, axis=1, keepdims=True)).sum(0)
    M[:, 2] = True
    feats, masks = _t(F, M)
    want, want_w = linear_oracle(F, M, text, ni, no)
    got = linear_fusion(feats, torch.from_numpy(text).float(), masks, normalize_inputs=ni, normalize_output=no,
                        chunk_size=6)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    x = torch.from_numpy(np.nan_to_num(F).astype(np.float32))
    w = linear_weights(x, torch.from_numpy(text).float(), torch.from_numpy(M)).numpy()
    np.testing.assert_allclose(w, want_w, atol=1e-5)
    if (text @ _unit(F[0, 2]) <= 0).all():  # no positive similarity there: equal weights
        np.testing.assert_allclose(w[:, 2], 1.0 / len(F))
    # without masks every teacher is valid
    w_all = linear_weights(x, torch.from_numpy(text).float()).numpy()
    np.testing.assert_allclose(w_all, linear_oracle(np.nan_to_num(F), np.ones_like(M), text)[1], atol=1e-5)


def test_empty_inputs_and_dtypes():
    text, S = torch.randn(4, 6), torch.rand(2, 4)
    empty = [torch.zeros(0, 6, dtype=torch.float16), torch.zeros(0, 6, dtype=torch.float16)]
    out, w = capability_fusion(empty, text, S, return_weights=True)
    assert out.shape == (0, 6) and out.dtype == torch.float16 and w.shape == (2, 0)
    assert add_fusion(empty).shape == (0, 6) and linear_fusion(empty, text).shape == (0, 6)
    F, M, text_np, S_np = _inputs(seed=4, T=2)
    feats = [torch.from_numpy(np.nan_to_num(f)).half() for f in F]
    got = capability_fusion(feats, torch.from_numpy(text_np).float(), torch.from_numpy(S_np).float(),
                            masks=[torch.from_numpy(m) for m in M])
    assert got.dtype == torch.float16
    want, _ = capability_oracle(np.stack([f.float().numpy() for f in feats]), M, text_np, S_np)
    np.testing.assert_allclose(got.float().numpy(), want, atol=2e-2)
    cfg = FusionConfig(method="add", add_reduce="mean")
    np.testing.assert_allclose(fuse(feats, masks=[torch.from_numpy(m) for m in M], config=cfg).float().numpy(),
                               add_oracle(np.stack([f.float().numpy() for f in feats]), M, "mean"), atol=2e-2)
