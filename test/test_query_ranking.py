"""VoxelMap queries: the returned max_points set against a full scan's top set, and the error
bound of the reduced store checked where it is tight (an unsound bound fails here)."""

import numpy as np
import pytest

from sas_core.geometry.voxel_map import VoxelMap, VoxelMapConfig


def _map(n=4000, dim=64, k=6, noise=0.3, rank=16, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(k, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    m = VoxelMap(VoxelMapConfig(voxel_size=0.05, max_points=n * 2, query_rank=rank))
    slots = m.integrate(rng.random((n, 3)).astype(np.float32) * 10)
    gt = rng.integers(0, k, len(slots))
    m.set_features(slots, text[gt] + noise * rng.normal(size=(len(slots), dim)).astype(np.float32))
    m.classify(text)
    m.refit_basis()
    return m, text, rng


def _exact_top(m, t, threshold, k):
    live = m.slots()
    ref = m.scan_query(t)
    above = ref >= threshold
    order = np.argsort(-ref[above], kind="stable")
    return live[above][order][:k], ref[above][order][:k]


@pytest.mark.parametrize("k", [1, 50, 400])
def test_vocabulary_word_returns_exactly_the_top_set(k):
    """A vocabulary word lies in the basis (error band ~0): the default query returns the exact
    top-k set of a full scan, best first (slot order instead of score order fails here)."""
    m, text, _ = _map()
    for word in text:
        want, want_scores = _exact_top(m, word, 0.2, k)
        res = m.query(word, threshold=0.2, max_points=k)
        assert len(want) == k  # more voxels match than k: the cut matters
        assert res.slots.tolist() == want.tolist()
        np.testing.assert_allclose(res.scores, want_scores, atol=1e-5)


def test_free_text_returns_the_best_guaranteed_voxels_or_the_exact_top_set():
    m, _, rng = _map()
    b = m._basis
    for _ in range(5):
        t = rng.normal(size=64).astype(np.float32)
        t /= np.linalg.norm(t)
        threshold, k = 0.0, 50
        want, want_scores = _exact_top(m, t, threshold, k)
        exact = m.query(t, threshold=threshold, max_points=k, exact_topk=True)
        assert exact.slots.tolist() == want.tolist()
        res = m.query(t, threshold=threshold, max_points=k)
        assert len(res.slots) == k and np.all(np.diff(res.scores) <= 1e-7)
        # the documented contract: every returned voxel scores at least the k-th best guaranteed
        # lower bound of the reduced store (bounds recomputed here from the store's definition)
        live = m.slots()
        t_r = b.T @ t
        tau = np.linalg.norm(t - b @ t_r)
        lo = m._codes[live] @ t_r - m._resid[live] * tau
        kth_lo = np.sort(lo)[-k]
        assert res.scores.min() >= kth_lo - 1e-4
        assert set(res.slots.tolist()) <= set(live[m.scan_query(t) >= threshold].tolist())


def test_error_bound_is_sound_where_it_is_tight():
    """The text ``a u + c r/|r|``: ``u`` a vocabulary direction inside the basis, ``r`` one voxel's
    residual (orthogonal to the basis). For that voxel the true score exceeds the reduced-store
    estimate by exactly the bound ``rho * tau``; the threshold sits just below its
    true score (a twentieth of the band below), and the vocabulary's own voxels score far above (so it cannot be rescued by the
    best-score rule). A sound bound keeps the voxel; a halved one loses it from count and answer."""
    m, text, _ = _map(noise=0.05)
    b = m._basis
    live = m.slots()
    a, c = 0.95, float(np.sqrt(1 - 0.95 ** 2))
    u = b @ (b.T @ text[0])
    u /= np.linalg.norm(u)
    tested = 0
    for slot in live[m.labels[live] != 0][:40]:
        f = m.features[slot].astype(np.float32)
        r = f - b @ (b.T @ f)
        t = (a * u + c * r / np.linalg.norm(r)).astype(np.float32)
        band = c * float(np.linalg.norm(r))
        threshold = float(f @ t) - 0.05 * band
        ref = m.scan_query(t)
        res = m.query(t, threshold=threshold)
        assert res.count == int((ref >= threshold).sum())
        assert slot in set(res.slots.tolist())
        tested += 1
    assert tested == 40
