"""sparsecore.export: forward weights as torch CSR / scipy CSR, and the
inference-only copy of a model."""
from __future__ import annotations

import pytest
import scipy.sparse as sp
import torch
from torch import nn

import sparsecore as sc
from sparsecore import export


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, (2, 3), dilation=(1, 2), bias=False)
        self.fc = nn.Linear(8 * 5 * 2, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.head(self.ln(torch.relu(self.fc(x))))


def _trained(refresh_every=2, steps=5, exclude=("head",)):
    torch.manual_seed(0)
    model = sc.SparseModel(Mixed(), forward_sparsity=0.8, backward_sparsity=0.5,
                           refresh_every=refresh_every, exploration=0.3, exclude=list(exclude))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 3, 12, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def trained():
    return _trained()


def _unprefixed(d):
    """Export names relative to the wrapped module (naming is checked separately)."""
    return {k.removeprefix("module."): v for k, v in d.items()}


def test_export_names_match_sparse_layers(trained):
    """Exports of a SparseModel are keyed like SparseModel.sparse_layers() and
    stats() and like the modules of inference_model(model): by the name inside
    the wrapped module ("fc", not "module.fc")."""
    model, _ = trained
    names = set(model.sparse_layers())
    assert names == set(model.stats()["layers"]) == {"conv", "conv2", "fc"}
    inf_names = {n for n, m in export.inference_model(model).named_modules()
                 if isinstance(m, export.SparseLinearInference)}
    assert inf_names == names
    assert set(export.forward_weights(model)) == names
    assert set(export.to_scipy(model)) == names


def test_forward_weights_are_the_forward_dense_weight(trained):
    model, _ = trained
    layers = model.sparse_layers()
    w = _unprefixed(export.forward_weights(model))
    assert set(w) == set(layers) == {"conv", "conv2", "fc"}
    for n, t in w.items():
        l = layers[n]
        assert t.layout == torch.sparse_csr
        assert tuple(t.shape) == (l.out_features, l.in_features)
        assert t.values().numel() == l.k_a == t._nnz()
        dense = l.to_dense("forward")
        assert torch.equal(t.to_dense(), dense), n
        # as an operator: the layer's output (before bias) for a linear layer
        if n == "fc":
            x = torch.randn(4, l.in_features)
            with torch.no_grad():
                torch.testing.assert_close((t @ x.t()).t() + l.bias, l(x), rtol=1e-5, atol=1e-6)


def test_to_scipy_equals_forward_weight(trained):
    model, _ = trained
    layers = model.sparse_layers()
    arrays = _unprefixed(export.to_scipy(model))
    assert set(arrays) == set(layers)
    for n, a in arrays.items():
        l = layers[n]
        assert isinstance(a, sp.csr_array)
        assert a.shape == (l.out_features, l.in_features) and a.nnz == l.k_a
        assert a.has_sorted_indices
        assert torch.equal(torch.from_numpy(a.toarray()), l.to_dense("forward")), n


def test_exports_are_copies():
    model, opt = _trained(refresh_every=1, steps=2)
    w = export.forward_weights(model)
    arrays = export.to_scipy(model)
    frozen = {n: t.to_dense().clone() for n, t in w.items()}
    before = _state(model)
    for t in w.values():
        t.values().mul_(0)
    for a in arrays.values():
        a.data[:] = 0
    _same(before, _state(model))
    # training the model further (steps and refreshes) leaves the exports alone
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    w2 = export.forward_weights(model)
    assert any(not torch.equal(frozen[n], w2[n].to_dense()) for n in w2)
    for n, a in export.to_scipy(model).items():
        assert torch.equal(torch.from_numpy(a.toarray()), w2[n].to_dense())


# ------------------------------------------------------------------ inference model

def _sparse_bytes_of_a(layers):
    """Bytes that a forward-only copy of A needs: values, int32 columns, int64 row
    pointers and the bias."""
    total = 0
    for l in layers.values():
        es = l.values.element_size()
        total += l.k_a * es + l.k_a * 4 + (l.out_features + 1) * 8
        total += l.out_features * es if l.bias is not None else 0
    return total


def test_inference_model_matches_and_holds_only_a():
    model, opt = _trained()
    layers = model.sparse_layers()
    model.train()
    before = _state(model)
    inf = export.inference_model(model)
    assert model.training, "the original keeps its mode"
    assert not inf.training
    _same(before, _state(model))

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 12, 12, generator=g)
    model.eval()
    with torch.no_grad():
        expect = model(x)
    got = inf(x)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    with torch.no_grad():                                          # unbatched conv input
        torch.testing.assert_close(inf.conv(x[0]), model.module.conv(x[0]), rtol=1e-6, atol=1e-6)

    # nothing of the training state came along
    assert not isinstance(inf, sc.SparseModel)
    assert not any(isinstance(m, sc.TopKASTLinear) for m in inf.modules())
    sparse_inf = {n: m for n, m in inf.named_modules() if isinstance(m, export.SparseLinearInference)}
    assert set(sparse_inf) == set(layers)
    for n, m in sparse_inf.items():
        assert list(m.parameters(recurse=False)) == []
        keys = set(m.state_dict())
        assert not keys & {"values", "reserve_idx", "reserve_val", "x_indptr", "x_cols",
                           "floor", "key"}, keys
        assert m.weight_values.numel() == layers[n].k_a
    inf_bytes = sum(b.numel() * b.element_size() for m in sparse_inf.values()
                    for b in m.buffers(recurse=False))
    assert inf_bytes == _sparse_bytes_of_a(layers)
    b_bytes = sum(l.k_b for l in layers.values()) * 4
    assert inf_bytes < b_bytes + sum(l.sparse_state.reserve_val.numel() * 4 for l in layers.values())
    for obj in _reachable(inf):
        assert not isinstance(obj, torch.optim.Optimizer)

    # the copy shares no storage with the original
    orig_ptrs = {t.untyped_storage().data_ptr() for t in _state_raw(model) if t.numel()}
    assert not any(t.untyped_storage().data_ptr() in orig_ptrs
                   for t in _state_raw(inf) if t.numel())

    # the original still trains, refreshes through its hook, and the copy stays put
    model.train()
    steps0 = model.step_count
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.zeros(7, dtype=torch.long)).backward()
        opt.step()
    assert model.step_count == steps0 + 2
    torch.testing.assert_close(inf(x), got, rtol=0, atol=0)


def _state_raw(m):
    return [v for v in m.state_dict(keep_vars=True).values() if torch.is_tensor(v)]


def _reachable(module):
    seen, out = set(), []
    stack = list(module.modules())
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, nn.Module):
            stack.extend(v for v in vars(o).values() if not isinstance(v, (dict, torch.Tensor)))
            for d in vars(o).values():
                if isinstance(d, dict):
                    stack.extend(v for v in d.values() if not isinstance(v, torch.Tensor))
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return out


def test_inference_of_plain_module_and_float64():
    torch.manual_seed(3)
    net = nn.Sequential(sc.TopKASTLinear(12, 9, forward_sparsity=0.7, backward_sparsity=0.4,
                                         dtype=torch.float64),
                        nn.Tanh(),
                        sc.TopKASTLinear(9, 4, bias=False, forward_sparsity=0.5,
                                         backward_sparsity=0.5, dtype=torch.float64))
    inf = export.inference_model(net)
    x = torch.randn(2, 3, 12, dtype=torch.float64)           # extra leading dims
    w0, w2 = net[0].to_dense("forward"), net[2].to_dense("forward")
    expect = torch.tanh(x @ w0.t() + net[0].bias) @ w2.t()
    torch.testing.assert_close(inf(x), expect, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(inf(x), net(x), rtol=1e-12, atol=1e-12)
    assert isinstance(net[0], sc.TopKASTLinear)              # original untouched
    with pytest.raises(ValueError, match="in_features=12"):
        inf(torch.randn(2, 11, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        inf(torch.randn(2, 12))


def test_no_sparse_layer_is_an_error():
    net = nn.Sequential(nn.Linear(3, 3))
    for fn in (export.forward_weights, export.to_scipy, export.inference_model):
        with pytest.raises(ValueError, match="no Top-KAST layer"):
            fn(net)
