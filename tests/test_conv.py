"""TopKASTConv2d against torch.nn.functional.conv2d on its dense-equivalent weight:
output, input gradient and the Top-KAST weight gradient on B; errors; a sparse CNN
built by SparseModel that learns."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsecore as sc

# (C, out, kernel, stride, padding, dilation, H, W)
GEOMETRIES = [
    (3, 4, 3, 1, 0, 1, 7, 7),
    (3, 5, 3, 1, 1, 1, 6, 8),
    (2, 4, 3, 2, 1, 1, 9, 7),
    (4, 3, (3, 2), (2, 1), (1, 0), 1, 8, 6),
    (2, 3, 3, 1, 2, 2, 7, 7),
    (3, 6, (1, 3), 1, (0, 2), (1, 3), 5, 9),
    (1, 2, 1, 1, 0, 1, 4, 5),                 # 1x1 convolution
    (5, 4, (2, 2), (3, 2), (0, 1), (2, 1), 11, 6),
    (2, 3, 5, 1, 2, 1, 5, 5),                 # kernel as large as the padded input allows
]


def _layer(C, out, k, s, p, d, *, sf=0.6, sb=0.3, lam=0.0, bias=True, seed=0,
           dtype=torch.float64):
    return sc.TopKASTConv2d(C, out, k, stride=s, padding=p, dilation=d, bias=bias,
                            forward_sparsity=sf, backward_sparsity=sb, exploration=lam,
                            seed=seed, dtype=dtype)


def _dense_weight(layer, which="forward"):
    kh, kw = layer.kernel_size
    return layer.to_dense(which).view(layer.out_channels, layer.in_channels, kh, kw)


def _ref(layer, x, w):
    return F.conv2d(x, w, layer.bias, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("batched", [True, False])
def test_output_and_input_gradient_match_conv2d(geom, batched):
    torch.manual_seed(hash(geom) % 1000)
    C, out, k, s, p, d, H, W = geom
    layer = _layer(C, out, k, s, p, d)
    w = _dense_weight(layer).detach()
    assert int((w != 0).sum()) == layer.k_a
    shape = (3, C, H, W) if batched else (C, H, W)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _ref(layer, x_ref, w)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMETRIES[:6], ids=[str(g) for g in GEOMETRIES[:6]])
def test_weight_gradient_on_b_matches_dense_conv_gradient(geom):
    torch.manual_seed(7)
    C, out, k, s, p, d, H, W = geom
    lam, sf = 0.3, 0.6
    layer = _layer(C, out, k, s, p, d, sf=sf, sb=0.3, lam=lam)
    x = torch.randn(4, C, H, W, dtype=torch.float64)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    # dL/dW of the dense convolution (linear in W: evaluated at the forward weight)
    w = _dense_weight(layer).detach().requires_grad_(True)
    (gw,) = torch.autograd.grad(_ref(layer, x, w), w, g)
    gw = gw.flatten()
    theta = layer.to_dense("theta").flatten()
    a = layer.active_indices()
    b_minus_a = torch.from_numpy(np.setdiff1d(layer.backward_indices().numpy(), a.numpy()))
    assert b_minus_a.numel() == layer.k_b - layer.k_a > 0
    # values are ordered: A's flat indices (row-major), then those of B minus A;
    # backward gives the data term, the step pre-hook adds the exploration term
    torch.testing.assert_close(layer.values.grad, torch.cat([gw[a], gw[b_minus_a]]),
                               rtol=1e-10, atol=1e-12)
    layer.apply_exploration()
    expect = torch.cat([gw[a] + lam * theta[a], gw[b_minus_a] + lam / (1 - sf) * theta[b_minus_a]])
    torch.testing.assert_close(layer.values.grad, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 2, 3)))
    # the B minus A part is not zero although the forward weight is zero there
    assert layer.values.grad[layer.k_a:].abs().sum() > 0


def test_dense_weight_layout_is_conv2d_weight_flatten():
    """Flat index i = o * (C*kh*kw) + c * (kh*kw) + r * kw + s, like nn.Conv2d.weight.flatten(1)."""
    layer = _layer(2, 3, (2, 3), 1, 0, 1, sf=0.0, sb=0.0)
    w = _dense_weight(layer, "theta")
    x = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    x[0, 1, 1, 2] = 1.0   # picks weight[:, 1, 1, 2]
    with torch.no_grad():
        y = layer(x) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y.flatten(), w[:, 1, 1, 2])


def test_float32_and_no_bias():
    torch.manual_seed(1)
    layer = sc.TopKASTConv2d(3, 8, 3, padding=1, bias=False, forward_sparsity=0.8,
                             backward_sparsity=0.5)
    assert layer.bias is None
    x = torch.randn(2, 3, 10, 10)
    ref = F.conv2d(x, _dense_weight(layer), None, padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_after_training_and_refresh_still_matches_conv2d():
    torch.manual_seed(2)
    layer = _layer(3, 4, 3, 1, 1, 1, sf=0.7, sb=0.4, lam=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    before = layer.active_indices().clone()
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
        layer.refresh(opt)
    assert not torch.equal(before, layer.active_indices())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _ref(layer, x, _dense_weight(layer)),
                               rtol=1e-12, atol=1e-12)


def test_gradcheck_input():
    torch.manual_seed(3)
    layer = _layer(2, 3, 3, 2, 1, 1, sf=0.5, sb=0.5)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# ------------------------------------------------------------------ errors

def test_bad_inputs():
    layer = _layer(3, 4, 3, 1, 0, 1)
    with pytest.raises(ValueError, match="C=3"):
        layer(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="C=3"):
        layer(torch.randn(4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="C=3"):
        layer(torch.randn(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="C=3"):
        layer(torch.randn(1, 2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(2, 3, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(3, 8, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 3, 8, 8))
    dilated = _layer(1, 1, 3, 1, 1, 3)   # effective kernel 7, padded input 2+5=7 fits
    assert dilated(torch.randn(1, 1, 5, 5, dtype=torch.float64)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="too small"):
        dilated(torch.randn(1, 1, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("kw", [
    dict(kernel_size=0), dict(kernel_size=(3, 3, 3)), dict(kernel_size=2.5),
    dict(kernel_size=3, stride=0), dict(kernel_size=3, padding=-1),
    dict(kernel_size=3, dilation=0), dict(kernel_size=3, padding="same"),
])
def test_bad_geometry(kw):
    name = next(k for k in kw if k != "kernel_size") if len(kw) > 1 else "kernel_size"
    with pytest.raises((ValueError, TypeError), match=name):
        sc.TopKASTConv2d(3, 4, forward_sparsity=0.5, backward_sparsity=0.5, **kw)


@pytest.mark.parametrize("cin, cout", [(0, 4), (3, 0), (2.0, 4)])
def test_bad_channels(cin, cout):
    with pytest.raises(ValueError, match="channels"):
        sc.TopKASTConv2d(cin, cout, 3, forward_sparsity=0.5, backward_sparsity=0.5)


# ------------------------------------------------------------------ via SparseModel

def test_sparse_model_keeps_conv_geometry():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                  bias=False), nn.ReLU(), nn.Conv2d(5, 4, 1))
    original_bias = net[2].bias.detach().clone()
    model = sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.4)
    c0, c2 = model.module[0], model.module[2]
    assert isinstance(c0, sc.TopKASTConv2d) and isinstance(c2, sc.TopKASTConv2d)
    assert (c0.in_channels, c0.out_channels, c0.kernel_size, c0.stride, c0.padding,
            c0.dilation) == (3, 5, (3, 2), (2, 1), (1, 0), (1, 2))
    assert c0.bias is None and torch.equal(c2.bias.detach(), original_bias)
    x = torch.randn(2, 3, 9, 9)
    h = F.relu(F.conv2d(x, _dense_weight(c0), None, stride=(2, 1), padding=(1, 0),
                        dilation=(1, 2)))
    ref = F.conv2d(h, _dense_weight(c2), c2.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_sparse_cnn_learns_digits():
    """A small CNN on sklearn's 8x8 digits, both convolutions and the head sparse."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    model = sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.5, refresh_every=10,
                           seed=0)
    assert sum(isinstance(m, sc.TopKASTConv2d) for m in model.modules()) == 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach(opt)
    before = {n: l.active_indices().clone() for n, l in model.sparse_layers().items()}
    for epoch in range(8):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc >= 0.9, acc
    assert model.stats()["layers"]["0"]["refreshes"] == model.step_count // 10 > 0
    assert any(not torch.equal(before[n], l.active_indices())
               for n, l in model.sparse_layers().items())
    assert math.isfinite(loss.item())
