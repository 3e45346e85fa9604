"""MinkUNet14A/18A/34C: OpenScene's exact state_dict layout, and forward/backward behaviour."""

import pytest
import torch

from sas_core.nn import SparseTensor, build_model
from sas_core.nn.minkunet import MinkUNet18A




def test_minkunet18a_768_has_openscene_key_layout_and_size():
    model = build_model("MinkUNet18A", in_channels=3, out_channels=768)
    sd = model.state_dict()
    assert len(sd) == 289
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 2) == 15.56, n_params
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv0p1s1.kernel"] == (125, 3, 32)          # k5 stem, ME layout (K^3, Cin, Cout)
    assert shapes["conv1p1s2.kernel"] == (8, 32, 32)
    assert shapes["block1.0.conv1.kernel"] == (27, 32, 32)
    assert shapes["block2.0.downsample.0.kernel"] == (32, 64)  # 1x1 stride 1: 2-D (Cin, Cout)
    assert shapes["block2.0.downsample.1.bn.running_var"] == (64,)
    assert shapes["convtr4p16s2.kernel"] == (8, 256, 128)
    assert shapes["block5.0.conv1.kernel"] == (27, 256, 128)   # cat(up 128, skip 128)
    assert shapes["block8.0.conv1.kernel"] == (27, 128, 96)    # cat(up 96, stem 32)
    assert shapes["final.kernel"] == (96, 768)
    assert "final.bias" not in sd and not any(k.endswith(".bias") and "bn" not in k for k in sd)
    assert "bntr7.bn.num_batches_tracked" in sd and "block8.1.norm2.bn.weight" in sd
    assert not any(k.startswith("block1.0.downsample") for k in sd)


@pytest.mark.parametrize("arch,n_keys", [("MinkUNet14A", 193), ("MinkUNet34C", 373)])
def test_other_architectures_key_counts(arch, n_keys):
    model = build_model(arch, 3, 512)
    sd = model.state_dict()
    assert len(sd) == n_keys and sd["final.kernel"].shape == (96, 512)
    if arch == "MinkUNet34C":
        assert "block4.5.conv2.kernel" in sd and sd["convtr4p16s2.kernel"].shape == (8, 256, 256)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="MinkUNet18A"):
        build_model("MinkUNet99Z")


def _scene(seed, n=400, side=14):
    g = torch.Generator().manual_seed(seed)
    c = torch.unique(torch.randint(0, side, (n, 3), generator=g), dim=0)
    return c.int()


def test_forward_output_on_input_coordinates_order_and_batch_independent():
    torch.manual_seed(0)
    model = build_model("MinkUNet14A", in_channels=3, out_channels=16).eval()
    a, b = _scene(1), _scene(2)
    ca = torch.cat([torch.zeros(len(a), 1, dtype=torch.int32), a], 1)
    cb = torch.cat([torch.ones(len(b), 1, dtype=torch.int32), b], 1)
    coords = torch.cat([ca, cb])
    feats = torch.randn(len(coords), 3)
    with torch.no_grad():
        out = model(SparseTensor(feats, coords))
        assert out.F.shape == (len(coords), 16) and torch.equal(out.C, coords)
        perm = torch.randperm(len(coords))
        out_p = model(SparseTensor(feats[perm], coords[perm]))
        assert torch.allclose(out_p.F, out.F[perm], atol=1e-5)
        alone = model(SparseTensor(feats[: len(a)], ca))  # eval BN: scenes do not interact
        assert torch.allclose(alone.F, out.F[: len(a)], atol=1e-5)
        # a translation by a multiple of 16 (the deepest stride) leaves the output unchanged
        shifted = coords.clone()
        shifted[:, 1:] += 32
        assert torch.allclose(model(SparseTensor(feats, shifted)).F, out.F, atol=1e-5)


def test_backward_reaches_every_parameter():
    model = build_model("MinkUNet14A", 3, 8)
    scene = _scene(3, n=1500, side=48)
    coords = torch.cat([torch.zeros(len(scene), 1, dtype=torch.int32), scene], 1)
    out = model(SparseTensor(torch.ones(len(coords), 3), coords))
    out.F.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.conv0p1s1.kernel.grad.abs().sum() > 0


def test_input_must_be_sparse_stride_one():
    model = MinkUNet18A(3, 4)
    with pytest.raises(TypeError):
        model(torch.zeros(3, 3))
