"""Whole models against the dense reference Top-KAST: a multi-layer SparseModel and a
TopKASTConv2d trained for several steps across refreshes; and the sampled top-K
path of the select kernel (n >= 131072) with heavy ties against a brute-force sort."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparsecore as sc
from sparsecore import kernels
from sparsecore.kernels.cpu import select

from reference import DenseTopKAST

LAM = 0.2


def _ref_of(layer):
    return DenseTopKAST(layer.to_dense(), layer.bias.detach().clone(), k_a=layer.k_a,
                        k_b=layer.k_b, exploration=LAM, density=layer.density)


def _same(layer, ref, where):
    assert torch.equal(layer.active_indices(), ref.active_indices()), where
    assert torch.equal(layer.backward_indices(), ref.backward_indices()), where
    torch.testing.assert_close(layer.to_dense(), ref.theta.detach(), rtol=0, atol=1e-9,
                               msg=where)


def test_multi_layer_sparse_model_equals_dense_reference():
    torch.manual_seed(0)
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(12, 24, dtype=torch.float64), torch.nn.Tanh(),
                                  torch.nn.Linear(24, 16, dtype=torch.float64), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 3, dtype=torch.float64))
    model = sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.4, refresh_every=2,
                           exploration=LAM, reserve=0.0, verbose=False)
    layers = model.sparse_layers()
    refs = {n: _ref_of(l) for n, l in layers.items()}
    ref_net = torch.nn.Sequential(refs["0"], torch.nn.Tanh(), refs["2"], torch.nn.Tanh(), refs["4"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.attach(opt)
    opt_r = torch.optim.Adam(ref_net.parameters(), lr=0.05)
    changed = 0.0
    for step in range(8):
        x = torch.randn(16, 12, dtype=torch.float64)
        y = torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                          # refreshes after steps 2, 4, 6, 8
        opt_r.zero_grad()
        F.cross_entropy(ref_net(x), y).backward()
        for r in refs.values():
            r.weight_grad()
        before = {n: r.theta.detach().clone() for n, r in refs.items()}
        opt_r.step()
        with torch.no_grad():
            for n, r in refs.items():         # theta outside B never changes
                r.theta[~r.b] = before[n][~r.b]
                for t in r._theta_state(opt_r):
                    t[~r.b] = 0
        if step % 2 == 1:
            for r in refs.values():
                old_a = r.a.clone()
                r.refresh(opt_r)
                changed += float((old_a != r.a).any())
        for n in layers:
            _same(layers[n], refs[n], (step, n))
    assert changed > 0, "the run must change some forward set"


class _DenseConvTopKAST(DenseTopKAST):
    """The dense reference, applied as a convolution of the layer's geometry."""

    def __init__(self, layer):
        super().__init__(layer.to_dense(), layer.bias.detach().clone(), k_a=layer.k_a,
                         k_b=layer.k_b, exploration=LAM, density=layer.density)
        self.shape = (layer.out_channels, layer.in_channels, *layer.kernel_size)
        self.geom = (layer.stride, layer.padding, layer.dilation)   # plain values, no module

    def forward(self, x):
        if self._alpha is None:
            self._alpha = (self.theta.detach() * self.a).requires_grad_(True)
        return F.conv2d(x, self._alpha.view(self.shape), self.bias, *self.geom)


def test_conv2d_trains_like_the_dense_reference():
    torch.manual_seed(1)
    layer = sc.TopKASTConv2d(3, 5, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1),
                             forward_sparsity=0.6, backward_sparsity=0.3, exploration=LAM,
                             reserve=0.0, dtype=torch.float64)
    ref = _DenseConvTopKAST(layer)
    opt_e = torch.optim.SGD(layer.parameters(), lr=0.2, momentum=0.9)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    for step in range(6):
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
        for model, opt in ((layer, opt_e), (ref, opt_r)):
            opt.zero_grad()
            torch.tanh(model(x)).pow(2).mean().backward()
        opt_e.step()
        ref.step(opt_r)
        if step % 2 == 1:
            layer.refresh(opt_e)
            ref.refresh(opt_r)
        _same(layer, ref, step)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 777, 60_000, 199_999])
def test_sampled_select_with_heavy_ties_equals_brute_force(dtype, k):
    n = 200_000                       # >= 4 * 32768: the sampled route runs first
    assert n >= 4 * select._SAMPLE
    rng = np.random.default_rng(k)
    v = rng.integers(-6, 7, n).astype(dtype) * dtype(0.25)   # 13 magnitudes: heavy ties
    v[rng.choice(n, 50, replace=False)] = dtype(3.0)         # a few large ones
    expect = np.sort(np.lexsort((np.arange(n), -np.abs(v)))[:k])
    got = kernels.select_topk(torch.from_numpy(v), k).numpy()
    np.testing.assert_array_equal(got, expect)
    # the threshold over several arrays (what the refresh uses) agrees with one array
    key, n_taken, _, n_equal = select.topk_threshold([v[:70_000], v[70_000:]], k)
    mag = float(np.abs(v)[expect].min())
    assert select.key_to_magnitude(key, dtype) == mag
    assert n_equal == int((np.abs(v) == mag).sum())
    assert n_taken == int((np.abs(v[expect]) == mag).sum())
