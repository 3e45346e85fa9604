"""Sparse convolutions against a dense conv3d / conv_transpose3d oracle (forward and backward)."""

import pytest
import torch
import torch.nn.functional as F

from sas_core.nn import (MinkowskiBatchNorm, MinkowskiConvolution, MinkowskiConvolutionTranspose,
                         MinkowskiReLU, SparseTensor, cat, cpu_kernels)
from sas_core.nn.conv import cpu_backend, dense_to_me_weight, me_to_dense_weight, set_cpu_backend
from sas_core.nn.sparse import kernel_offsets

G, B = 8, 2


@pytest.fixture(autouse=True, params=["fused", "torch"])
def backend(request, monkeypatch):
    """Every test runs on both CPU paths; the fused one with 16-row tiles, so that the small
    grids here span many tiles (and tile borders)."""
    if request.param == "fused" and not cpu_kernels.available():
        pytest.skip("numba not importable")
    before = set_cpu_backend(request.param)
    monkeypatch.setattr(cpu_kernels, "DEFAULT_TILE", 16)
    assert cpu_backend() == request.param
    yield request.param
    set_cpu_backend(before)




def random_grid(density=0.3, seed=0, offset=0):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(B, G, G, G, generator=g) < density
    c = torch.nonzero(occ).int()
    c[:, 1:] += offset
    # shuffle rows: the layers must not depend on the input order
    return c[torch.randperm(len(c), generator=g)]


def to_dense(feats, coords, stride=1, size=G, offset=0):
    c = coords.long()
    d = feats.new_zeros(B, feats.shape[1], size, size, size)
    d[c[:, 0], :, (c[:, 1] - offset) // stride, (c[:, 2] - offset) // stride, (c[:, 3] - offset) // stride] = feats
    return d


def sample(dense, coords, stride=1, offset=0):
    c = coords.long()
    return dense[c[:, 0], :, (c[:, 1] - offset) // stride, (c[:, 2] - offset) // stride, (c[:, 3] - offset) // stride]


def test_kernel_offsets_follow_minkowski_order():
    o3 = kernel_offsets(3)
    assert o3.shape == (27, 3)
    assert o3[0].tolist() == [-1, -1, -1] and o3[13].tolist() == [0, 0, 0] and o3[26].tolist() == [1, 1, 1]
    assert o3[1].tolist() == [0, -1, -1]  # x varies fastest: k = ix + K*iy + K^2*iz
    assert o3[3].tolist() == [-1, 0, -1] and o3[9].tolist() == [-1, -1, 0]
    o2 = kernel_offsets(2)
    assert o2.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert kernel_offsets(5).min().item() == -2 and kernel_offsets(5).max().item() == 2


def test_weight_permutation_roundtrip_and_meaning():
    w = torch.randn(27, 4, 6)
    d = me_to_dense_weight(w, 3)
    assert d.shape == (6, 4, 3, 3, 3)
    assert torch.equal(dense_to_me_weight(d), w)
    # offset index k = ix + 3*iy + 9*iz lands at dense [:, :, ix, iy, iz]
    k = 2 + 3 * 0 + 9 * 1
    assert torch.equal(d[:, :, 2, 0, 1], w[k].t())
    wt = torch.randn(8, 4, 6)
    dt = me_to_dense_weight(wt, 2, transposed=True)
    assert dt.shape == (4, 6, 2, 2, 2)
    assert torch.equal(dt[:, :, 1, 1, 0], wt[1 + 2 * 1])
    assert torch.equal(dense_to_me_weight(dt, transposed=True), wt)


def _check_grads(sparse_out, dense_ref, x, kernel, tol=1e-4):
    g = torch.randn_like(sparse_out)
    gx, gw = torch.autograd.grad(sparse_out, (x, kernel), g, retain_graph=True)
    rx, rw = torch.autograd.grad(dense_ref, (x, kernel), g)
    assert torch.allclose(gx, rx, atol=tol, rtol=tol), (gx - rx).abs().max()
    assert torch.allclose(gw, rw, atol=tol, rtol=tol), (gw - rw).abs().max()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("offset", [0, -5])
def test_submanifold_matches_dense_conv3d(kernel_size, offset):
    coords = random_grid(seed=kernel_size, offset=offset)
    x = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    conv = MinkowskiConvolution(3, 5, kernel_size=kernel_size).double()
    assert conv.bias is None  # bias off by default (ME)
    expected = (3, 5) if kernel_size == 1 else (kernel_size ** 3, 3, 5)
    assert tuple(conv.kernel.shape) == expected
    y = conv(SparseTensor(x, coords))
    assert torch.equal(y.C, coords) and y.tensor_stride == 1
    w = conv.kernel if kernel_size > 1 else conv.kernel[None]
    ref = sample(F.conv3d(to_dense(x, coords, offset=offset), me_to_dense_weight(w, kernel_size),
                          padding=kernel_size // 2), coords, offset=offset)
    assert torch.allclose(y.F, ref, atol=1e-10)
    _check_grads(y.F, ref, x, conv.kernel)


def test_strided_k2s2_matches_dense_and_floor_coordinates():
    coords = random_grid(seed=3, offset=-3)  # negative coordinates: floor, not truncation
    x = torch.randn(len(coords), 4, dtype=torch.float64, requires_grad=True)
    conv = MinkowskiConvolution(4, 6, kernel_size=2, stride=2).double()
    y = conv(SparseTensor(x, coords))
    assert y.tensor_stride == 2
    c = coords.long()
    expect = torch.unique(torch.cat([c[:, :1], torch.div(c[:, 1:], 2, rounding_mode="floor") * 2], 1), dim=0)
    got = y.C.long()
    assert torch.equal(torch.unique(got, dim=0), expect) and len(got) == len(expect)
    # dense oracle on a grid shifted to an even origin (-4)
    d = F.conv3d(to_dense(x, coords, offset=-4, size=G + 2), me_to_dense_weight(conv.kernel, 2), stride=2)
    ref = sample(d, y.C, stride=2, offset=-4)
    assert torch.allclose(y.F, ref, atol=1e-10)
    _check_grads(y.F, ref, x, conv.kernel)


def test_strided_generic_kernel3_stride2_matches_dense():
    coords = random_grid(seed=4)
    x = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    conv = MinkowskiConvolution(3, 4, kernel_size=3, stride=2).double()
    y = conv(SparseTensor(x, coords))
    # output u (multiple of 2) gathers u + (-1..1): dense conv with padding 1, stride 2
    d = F.conv3d(to_dense(x, coords), me_to_dense_weight(conv.kernel, 3), stride=2, padding=1)
    ref = sample(d, y.C, stride=2)
    assert torch.allclose(y.F, ref, atol=1e-10)
    _check_grads(y.F, ref, x, conv.kernel)


def test_transposed_k2s2_writes_back_onto_encoder_coordinates():
    coords = random_grid(seed=5)
    x = torch.randn(len(coords), 3, dtype=torch.float64)
    down = MinkowskiConvolution(3, 4, kernel_size=2, stride=2).double()
    up = MinkowskiConvolutionTranspose(4, 5, kernel_size=2, stride=2).double()
    coarse = down(SparseTensor(x, coords))
    h = torch.randn(len(coarse), 4, dtype=torch.float64, requires_grad=True)
    coarse_h = coarse.replace_feature(h)
    y = up(coarse_h)
    assert y.tensor_stride == 1 and torch.equal(y.C, coords)  # the finer (encoder) set, same order
    assert y.manager is coarse.manager
    d = F.conv_transpose3d(to_dense(h, coarse.C, stride=2, size=G // 2), me_to_dense_weight(up.kernel, 2, True),
                           stride=2)
    ref = sample(d, coords)
    assert torch.allclose(y.F, ref, atol=1e-10)
    _check_grads(y.F, ref, h, up.kernel)


def test_transposed_generic_kernel3_stride2_matches_dense():
    coords = random_grid(seed=10)
    down = MinkowskiConvolution(3, 4, kernel_size=3, stride=2).double()
    coarse = down(SparseTensor(torch.randn(len(coords), 3, dtype=torch.float64), coords))
    h = torch.randn(len(coarse), 4, dtype=torch.float64, requires_grad=True)
    up = MinkowskiConvolutionTranspose(4, 2, kernel_size=3, stride=2).double()
    y = up(coarse.replace_feature(h))
    assert torch.equal(y.C, coords)
    # fine p receives coarse q where p = q + i, i in -1..1: conv_transpose3d with padding 1
    d = F.conv_transpose3d(to_dense(h, coarse.C, stride=2, size=G // 2), me_to_dense_weight(up.kernel, 3, True),
                           stride=2, padding=1, output_padding=1)
    ref = sample(d, coords)
    assert torch.allclose(y.F, ref, atol=1e-10)
    _check_grads(y.F, ref, h, up.kernel)


def test_float32_gradients_within_1e4_and_bias():
    coords = random_grid(seed=6)
    x = torch.randn(len(coords), 8, requires_grad=True)
    conv = MinkowskiConvolution(8, 8, kernel_size=3, bias=True)
    assert conv.bias.shape == (1, 8)
    y = conv(SparseTensor(x, coords))
    ref = sample(F.conv3d(to_dense(x, coords), me_to_dense_weight(conv.kernel, 3), conv.bias[0], padding=1), coords)
    assert torch.allclose(y.F, ref, atol=1e-5)
    _check_grads(y.F, ref, x, conv.kernel, tol=1e-4)


def test_batchnorm_relu_cat_and_errors():
    coords = random_grid(seed=7)
    st = SparseTensor(torch.randn(len(coords), 4), coords)
    bn = MinkowskiBatchNorm(4)
    assert set(bn.state_dict()) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                    "bn.num_batches_tracked"}
    out = MinkowskiReLU()(bn(st))
    assert (out.F >= 0).all() and torch.allclose(out.F.mean(0), torch.relu(bn.bn(st.F)).mean(0))
    joined = cat(out, st)
    assert joined.F.shape == (len(coords), 8) and torch.equal(joined.F[:, 4:], st.F)
    down = MinkowskiConvolution(4, 4, 2, 2)(st)
    with pytest.raises(ValueError, match="same coordinate set"):
        cat(st, down)
    with pytest.raises(ValueError, match="duplicate"):
        SparseTensor(torch.zeros(2, 1), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="input channels"):
        MinkowskiConvolution(3, 4, 3)(st)
    with pytest.raises(ValueError, match="finer coordinate set"):
        MinkowskiConvolutionTranspose(4, 4, 2, 2)(st)


def test_half_precision_on_cpu_is_computed_in_float32():
    coords = random_grid(seed=8)
    x = torch.randn(len(coords), 4)
    conv = MinkowskiConvolution(4, 4, kernel_size=3)
    y32 = conv(SparseTensor(x, coords)).F
    y16 = conv(SparseTensor(x.half(), coords)).F
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), y32, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    coords = random_grid(seed=9)
    x = torch.randn(len(coords), 8)
    conv = MinkowskiConvolution(8, 8, kernel_size=3)
    ref = conv(SparseTensor(x, coords)).F
    conv_c = conv.cuda()
    out = conv_c(SparseTensor(x.cuda().to(dtype), coords.cuda())).F
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype and torch.allclose(out.float().cpu(), ref, atol=tol, rtol=tol)


def test_fused_and_torch_paths_agree_on_many_tiles_with_two_threads(backend, monkeypatch):
    """Forward and both gradients of the two CPU paths on a 24^3 grid (~8k voxels, default
    tiles) with two threads: tiles are processed in parallel and must not race."""
    if backend != "fused":
        pytest.skip("compares the fused path with the torch path")
    g = torch.Generator().manual_seed(11)
    coords = torch.nonzero(torch.rand(1, 24, 24, 24, generator=g) < 0.3).int()
    coords = coords[torch.randperm(len(coords), generator=g)]
    x = torch.randn(len(coords), 16, requires_grad=True)
    conv = MinkowskiConvolution(16, 24, kernel_size=3)
    strided = MinkowskiConvolution(16, 8, kernel_size=3, stride=2)
    torch.set_num_threads(2)  # the suite-wide fixture restores the count
    monkeypatch.setattr(cpu_kernels, "DEFAULT_TILE", 512)
    results = {}
    for name in ("fused", "torch"):
        set_cpu_backend(name)
        st = SparseTensor(x, coords)
        out = torch.cat([conv(st).F.sum(1), strided(st).F.sum(1)])
        gx, gw, gs = torch.autograd.grad(out.pow(2).sum(), (x, conv.kernel, strided.kernel))
        results[name] = (out, gx, gw, gs)
        if name == "fused":
            _, km = st.manager.kernel_map(1, 3)
            assert ("tiles", 512, False) in km.derived and ("tiles", 512, True) in km.derived
    for a, b in zip(results["fused"], results["torch"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_cpu_backend_choice_is_validated():
    with pytest.raises(ValueError, match="CPU backend"):
        set_cpu_backend("cuda")


def test_empty_and_single_voxel_inputs():
    """No rows and one isolated voxel (no neighbours): shapes, values and gradients."""
    for n in (0, 1):
        coords = torch.full((n, 4), 3, dtype=torch.int32)
        x = torch.randn(n, 3, requires_grad=True)
        conv = MinkowskiConvolution(3, 4, kernel_size=3)
        down = MinkowskiConvolution(3, 2, kernel_size=2, stride=2)
        st = SparseTensor(x, coords)
        y, d = conv(st), down(st)
        assert y.F.shape == (n, 4) and d.F.shape == (n, 2)
        # an isolated voxel sees only the centre offset; (3,3,3) sits at offset (1,1,1) of its 2-cell
        assert torch.allclose(y.F, x @ conv.kernel[13]) and torch.allclose(d.F, x @ down.kernel[7])
        (y.F.sum() + d.F.sum()).backward()
        assert x.grad.shape == (n, 3)
        assert torch.allclose(conv.kernel.grad[13], x.detach().t() @ torch.ones(n, 4))
        assert float(conv.kernel.grad[:13].abs().sum()) == 0.0


def test_blas_thread_count_is_restored_after_the_fused_kernels(backend):
    """SciPy's OpenBLAS runs on one thread inside our kernels and gets the user's count back."""
    if backend != "fused" or cpu_kernels._openblas_threads() is None:
        pytest.skip("fused path with SciPy's OpenBLAS only")
    get, set_ = cpu_kernels._openblas_threads()
    before = get()
    set_(2)
    try:
        seen = []
        numba_mod, real, *rest = cpu_kernels._kernels()
        coords = random_grid(seed=12)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "_kernels",
                       lambda: (numba_mod, lambda *a: seen.append(get()) or real(*a), *rest))
            MinkowskiConvolution(3, 4, kernel_size=3)(SparseTensor(torch.randn(len(coords), 3), coords))
        assert seen == [1] and get() == 2
    finally:
        set_(before)
