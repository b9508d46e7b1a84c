"""TopKASTLinear against the dense reference Top-KAST, autograd checks, errors."""
from __future__ import annotations

import gc
import math
import os
import warnings

import pytest
import torch

import sparsecore as sc
from sparsecore.topkast import sizes

from reference import DenseTopKAST, topk_mask

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


def _pair(in_f=40, out_f=24, sf=0.8, sb=0.6, lam=0.5, reserve=0.0, bias=True, seed=3,
          dtype=torch.float64):
    layer = sc.TopKASTLinear(in_f, out_f, bias=bias, forward_sparsity=sf, backward_sparsity=sb,
                             exploration=lam, seed=seed, reserve=reserve, dtype=dtype)
    ref = DenseTopKAST(layer.to_dense(), layer.bias.detach() if bias else None,
                       k_a=layer.k_a, k_b=layer.k_b, exploration=lam, density=1 - sf)
    return layer, ref


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("reserve", [0.0, 0.5])
def test_engine_equals_dense_reference(opt_name, reserve):
    torch.manual_seed(0)
    layer, ref = _pair(reserve=reserve)
    assert torch.equal(layer.active_indices(), ref.active_indices())
    assert torch.equal(layer.backward_indices(), ref.backward_indices())
    opt_e = OPTIMIZERS[opt_name](list(layer.parameters()))
    opt_r = OPTIMIZERS[opt_name](list(ref.parameters()))
    w_true = torch.randn(24, 40, dtype=torch.float64)
    changed = replenished = 0
    for step in range(30):
        x = torch.randn(16, 40, dtype=torch.float64)
        target = torch.tanh(x @ w_true.t())
        for model, opt in ((layer, opt_e), (ref, opt_r)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(torch.tanh(model(x)), target)
            loss.backward()
        opt_e.step()
        ref.step(opt_r)
        if step % 3 == 2:
            old_a, old_b = ref.a.clone(), ref.b.clone()
            info = layer.refresh(opt_e)
            ref.refresh(opt_r)
            assert info["changed_a"] == pytest.approx(1 - (old_a & ref.a).sum().item() / layer.k_a)
            assert info["changed_b"] == pytest.approx(1 - (old_b & ref.b).sum().item() / layer.k_b)
            assert info["entered_a_from_outside_b"] == (ref.a & ~old_b).sum().item()
            changed += info["changed_b"] > 0
            replenished += info["replenished"]
            assert torch.equal(layer.active_indices(), ref.active_indices()), step
            assert torch.equal(layer.backward_indices(), ref.backward_indices()), step
        torch.testing.assert_close(layer.to_dense(), ref.theta.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(layer.bias, ref.bias, rtol=0, atol=1e-9)
    assert changed >= 3, "the test must exercise mask churn"
    if reserve == 0.0:
        assert replenished >= 1, "reserve=0 must force at least one replenishing scan"


def test_optimizer_state_follows_coordinates():
    torch.manual_seed(1)
    layer, ref = _pair(lam=0.5)
    opt_e = torch.optim.Adam(layer.parameters(), lr=0.05)
    opt_r = torch.optim.Adam(ref.parameters(), lr=0.05)
    x = torch.randn(8, 40, dtype=torch.float64)
    for _ in range(4):
        for model, opt in ((layer, opt_e), (ref, opt_r)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
        opt_e.step()
        ref.step(opt_r)
    layer.refresh(opt_e)
    ref.refresh(opt_r)
    order = torch.cat([layer.active_indices(),
                       torch.from_numpy(layer.sparse_state.x_flat())])
    for key in ("exp_avg", "exp_avg_sq"):
        dense_state = opt_r.state[ref.theta][key].flatten()
        torch.testing.assert_close(opt_e.state[layer.values][key], dense_state[order],
                                   rtol=0, atol=1e-12)


def test_weight_gradient_matches_dense_formula():
    torch.manual_seed(2)
    lam, sf = 0.3, 0.7
    layer = sc.TopKASTLinear(30, 20, forward_sparsity=sf, backward_sparsity=0.4,
                             exploration=lam, dtype=torch.float64)
    x = torch.randn(3, 5, 30, dtype=torch.float64, requires_grad=True)  # 3-D input
    y = layer(x)
    assert y.shape == (3, 5, 20)
    w = layer.to_dense("forward")
    torch.testing.assert_close(y, x @ w.t() + layer.bias)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w)
    full = torch.einsum("abo,abi->oi", g, x.detach()).flatten()
    theta = layer.to_dense().flatten()
    a = layer.active_indices()
    xb = torch.from_numpy(layer.sparse_state.x_flat())
    # backward gives the data term only; the exploration term is added once per
    # optimizer step (by the step pre-hook, which calls apply_exploration)
    torch.testing.assert_close(layer.values.grad, torch.cat([full[a], full[xb]]))
    layer.apply_exploration()
    expect = torch.cat([full[a] + lam * theta[a], full[xb] + lam / (1 - sf) * theta[xb]])
    torch.testing.assert_close(layer.values.grad, expect)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 1)))


def test_gradcheck_float64():
    torch.manual_seed(3)
    # B = A and lambda = 0: the autograd function is then an ordinary differentiable map
    layer = sc.TopKASTLinear(7, 5, forward_sparsity=0.5, backward_sparsity=0.5,
                             exploration=0.0, dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, v, b: sc.functional.topkast_linear(
        inp, v, layer.sparse_state, b), (x, layer.values, layer.bias))


def test_float32_matches_float64():
    torch.manual_seed(4)
    l32 = sc.TopKASTLinear(64, 48, forward_sparsity=0.9, backward_sparsity=0.8, seed=7)
    l64 = sc.TopKASTLinear(64, 48, forward_sparsity=0.9, backward_sparsity=0.8, seed=7,
                           dtype=torch.float64)
    with torch.no_grad():
        l64.bias.copy_(l32.bias)
    assert torch.equal(l32.active_indices(), l64.active_indices())
    x = torch.randn(10, 64)
    torch.testing.assert_close(l32(x).double(), l64(x.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_bias_option(bias):
    layer = sc.TopKASTLinear(10, 6, bias=bias, forward_sparsity=0.5, backward_sparsity=0.2)
    assert (layer.bias is not None) == bias
    y = layer(torch.randn(2, 10))
    w = layer.to_dense("forward")
    expect = torch.randn(2, 10)
    y = layer(expect)
    ref = expect @ w.t() + (layer.bias if bias else 0)
    torch.testing.assert_close(y, ref)


def test_sizes_and_repr():
    layer = sc.TopKASTLinear(100, 50, forward_sparsity=0.9, backward_sparsity=0.75)
    assert (layer.k_a, layer.k_b) == (500, 1250)
    assert layer.values.shape == (1250,)
    assert "nnz_A=500" in repr(layer) and "pool=" in repr(layer)
    assert sizes(10, 10, 0.999, 0.999) == (1, 1)  # K_A >= 1


def test_values_parameter_identity_survives_refresh():
    layer = sc.TopKASTLinear(30, 30, forward_sparsity=0.9, backward_sparsity=0.8, exploration=1.0)
    p = layer.values
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(4, 30)).sum().backward()
    opt.step()
    layer.refresh(opt)
    assert layer.values is p and p.shape == (layer.k_b,)


def test_same_seed_same_layer_other_seed_differs():
    a = sc.TopKASTLinear(50, 40, forward_sparsity=0.9, backward_sparsity=0.8, seed=1)
    b = sc.TopKASTLinear(50, 40, forward_sparsity=0.9, backward_sparsity=0.8, seed=1)
    c = sc.TopKASTLinear(50, 40, forward_sparsity=0.9, backward_sparsity=0.8, seed=2)
    assert torch.equal(a.values, b.values) and torch.equal(a.active_indices(), b.active_indices())
    assert not torch.equal(a.active_indices(), c.active_indices())


def test_initial_sets_are_topk_of_init():
    layer = sc.TopKASTLinear(33, 17, forward_sparsity=0.7, backward_sparsity=0.3, reserve=0.0)
    theta = layer.to_dense()
    assert theta.abs().max() <= 1 / math.sqrt(33)
    a = torch.nonzero(topk_mask(theta, layer.k_a).flatten()).flatten()
    assert torch.equal(layer.active_indices(), a)


def test_normal_init():
    layer = sc.TopKASTLinear(400, 300, forward_sparsity=0.5, backward_sparsity=0.5, init="normal")
    theta = layer.to_dense()
    assert abs(theta.std().item() - 1 / math.sqrt(400)) < 0.002


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw, exc, match", [
    (dict(forward_sparsity=1.0, backward_sparsity=0.5), ValueError, "forward_sparsity"),
    (dict(forward_sparsity=-0.1, backward_sparsity=0.0), ValueError, "forward_sparsity"),
    (dict(forward_sparsity=0.5, backward_sparsity=0.6), ValueError, "backward_sparsity"),
    (dict(forward_sparsity=0.5, backward_sparsity=-0.1), ValueError, "backward_sparsity"),
    (dict(forward_sparsity=float("nan"), backward_sparsity=0.1), TypeError, "forward_sparsity"),
    (dict(forward_sparsity=0.5, backward_sparsity=0.1, exploration=-1), ValueError, "exploration"),
    (dict(forward_sparsity=0.5, backward_sparsity=0.1, reserve=-1), ValueError, "reserve"),
    (dict(forward_sparsity=0.5, backward_sparsity=0.1, init="xavier"), ValueError, "init"),
    (dict(forward_sparsity=0.5, backward_sparsity=0.1, dtype=torch.float16), TypeError, "dtype"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        sc.TopKASTLinear(10, 10, **kw)


@pytest.mark.parametrize("in_f, out_f", [(0, 5), (5, 0), (-1, 5), (2.5, 5)])
def test_bad_features(in_f, out_f):
    with pytest.raises(ValueError, match="features"):
        sc.TopKASTLinear(in_f, out_f, forward_sparsity=0.5, backward_sparsity=0.5)


def test_bad_inputs():
    layer = sc.TopKASTLinear(10, 4, forward_sparsity=0.5, backward_sparsity=0.5)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 11))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(3, 10, device="meta"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda.*is_available"):
            sc.TopKASTLinear(10, 4, forward_sparsity=0.5, backward_sparsity=0.5, device="cuda")


def test_nan_at_refresh_raises_and_changes_nothing():
    layer = sc.TopKASTLinear(20, 10, forward_sparsity=0.8, backward_sparsity=0.6, exploration=1.0)
    opt = torch.optim.Adam(layer.parameters(), lr=0.5)
    layer(torch.randn(4, 20)).sum().backward()
    opt.step()
    with torch.no_grad():
        layer.values[3] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    state_before = {k: v.clone() for k, v in opt.state[layer.values].items()}
    with pytest.raises(sc.RefreshError, match="non-finite"):
        layer.refresh(opt)
    after = layer.state_dict()
    for k, v in before.items():   # unchanged, the NaN included
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for k, v in state_before.items():
        assert torch.equal(v, opt.state[layer.values][k])


def test_to_dense_refuses_huge_layer():
    layer = sc.TopKASTLinear(100_000, 100_000, forward_sparsity=0.99999, backward_sparsity=0.99998)
    with pytest.raises(ValueError, match="refused"):
        layer.to_dense()
    with pytest.raises(ValueError, match="which"):
        sc.TopKASTLinear(4, 4, forward_sparsity=0.5, backward_sparsity=0.5).to_dense("grad")


# ------------------------------------------------------------------ state dict

def _trained(seed=0, **kw):
    torch.manual_seed(seed)
    layer = sc.TopKASTLinear(30, 20, forward_sparsity=0.8, backward_sparsity=0.6,
                             exploration=1.0, reserve=0.0, **kw)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 30)).pow(2).sum().backward()
        opt.step()
        layer.refresh(opt)
    return layer


def test_state_dict_roundtrip_resumes_exactly():
    src = _trained(seed=0)
    dst = sc.TopKASTLinear(30, 20, forward_sparsity=0.8, backward_sparsity=0.6,
                           exploration=1.0, reserve=0.0, seed=99)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.to_dense(), src.to_dense())
    x = torch.randn(5, 30)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    for lay in (src, dst):  # further refreshes stay identical (key and floor restored)
        with torch.no_grad():
            lay.values.mul_(-0.01)
        lay.refresh()
    assert torch.equal(dst.to_dense(), src.to_dense())


def test_state_dict_mismatch_refused_and_layer_unchanged():
    src = _trained()
    other = sc.TopKASTLinear(30, 20, forward_sparsity=0.9, backward_sparsity=0.6)
    before = other.to_dense().clone()
    with pytest.raises(RuntimeError, match="another configuration"):
        other.load_state_dict(src.state_dict())
    assert torch.equal(other.to_dense(), before)
    bad = src.state_dict()
    bad["a_cols"] = bad["a_cols"].clone()
    bad["a_cols"][0] = 10_000
    dst = sc.TopKASTLinear(30, 20, forward_sparsity=0.8, backward_sparsity=0.6)
    before = dst.to_dense().clone()
    with pytest.raises(RuntimeError, match="out of range"):
        dst.load_state_dict(bad)
    assert torch.equal(dst.to_dense(), before)
    missing = src.state_dict()
    del missing["reserve_idx"]
    with pytest.raises(RuntimeError, match="missing"):
        dst.load_state_dict(missing)


@pytest.mark.parametrize("reserve", [0.0, 0.25, 1.0])
def test_heavy_churn_spills_and_stays_exact(reserve, tmp_path):
    """Refresh after every step with a large learning rate: the reserve fills with
    coordinates that left B; past its cap it is cut back (untrained entries
    dropped, trained ones spilled to the cold store on disk) and the floor rises;
    later refreshes replenish below it and read spilled entries back. A, B and
    theta stay equal to the dense reference throughout, the RAM pool stays within
    K_B + the cap, and ever_in_b counts the union of B exactly."""
    torch.manual_seed(11)
    layer, ref = _pair(in_f=60, out_f=40, sf=0.9, sb=0.8, reserve=reserve)
    layer.spill_dir = str(tmp_path)
    opt_e = torch.optim.AdamW(layer.parameters(), lr=0.2, weight_decay=0.5)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=0.2, weight_decay=0.5)
    seen = dict.fromkeys(("trimmed", "spilled", "unspilled"), 0)
    ever_b = ref.b.clone()
    for step in range(24):
        x = torch.randn(8, 60, dtype=torch.float64)
        target = torch.randn(8, 40, dtype=torch.float64)
        for model, opt in ((layer, opt_e), (ref, opt_r)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), target).backward()
        opt_e.step()
        ref.step(opt_r)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            info = layer.refresh(opt_e)
        ref.refresh(opt_r)
        for k in seen:
            seen[k] += info[k]
        ever_b |= ref.b
        assert layer.stats["ever_in_b"] == int(ever_b.sum()), step
        assert layer.sparse_state.n_reserve <= layer._reserve_cap(), step
        assert torch.equal(layer.active_indices(), ref.active_indices()), step
        assert torch.equal(layer.backward_indices(), ref.backward_indices()), step
        torch.testing.assert_close(layer.to_dense(), ref.theta.detach(), rtol=0, atol=1e-9)
    assert all(seen.values()), f"the test must drop, spill and read back entries: {seen}"
    cold = layer.sparse_state.cold
    assert cold.n == layer.stats["spilled"] > 0
    assert os.path.dirname(cold.prefix) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(cold.prefix) + e
                                                  for e in (".idx", ".val"))  # old runs deleted
    assert layer.sparse_state.nbytes()["spilled"] == cold.n * (8 + 8)
    path = cold.prefix
    del layer, cold
    gc.collect()
    assert not os.path.exists(path + ".idx")   # the files go with the last state holding them


def test_a_replenishing_refresh_reads_the_thresholds_once(monkeypatch):
    """The floor check is a count of pool entries at or above the floor; the K_A / K_B
    (/ reserve) thresholds are read from the pool once, after the replenishing, and
    the sets still equal the dense reference's."""
    from sparsecore import topkast
    calls = []
    real = topkast._select.topk_thresholds
    monkeypatch.setattr(topkast._select, "topk_thresholds",
                        lambda pieces, ks: calls.append(list(ks)) or real(pieces, ks))
    torch.manual_seed(5)
    layer, ref = _pair(in_f=60, out_f=40, sf=0.9, sb=0.8, reserve=0.25)
    opt_e = torch.optim.AdamW(layer.parameters(), lr=0.2, weight_decay=0.5)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=0.2, weight_decay=0.5)
    replenishing = 0
    for step in range(8):
        x = torch.randn(8, 60, dtype=torch.float64)
        for model, opt in ((layer, opt_e), (ref, opt_r)):
            opt.zero_grad()
            model(x).square().mean().backward()
        opt_e.step()
        ref.step(opt_r)
        calls.clear()
        info = layer.refresh(opt_e)
        ref.refresh(opt_r)
        assert len(calls) == 1 and calls[0][:2] == [layer.k_b, layer.k_a], (step, calls)
        replenishing += info["replenished"] > 0
        assert torch.equal(layer.backward_indices(), ref.backward_indices()), step
        assert torch.equal(layer.active_indices(), ref.active_indices()), step
    assert replenishing >= 2, "the test must replenish"


def test_memory_report_counts_the_cold_store_off_ram(tmp_path):
    torch.manual_seed(0)
    model = sc.SparseModel(torch.nn.Sequential(torch.nn.Linear(60, 40)), forward_sparsity=0.9,
                           backward_sparsity=0.8, reserve=0.0, refresh_every=1,
                           spill_dir=str(tmp_path), verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.2, weight_decay=0.5)
    model.attach(opt)
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(8, 60)).pow(2).sum().backward()
        opt.step()
    layer = model.sparse_layers()["0"]
    assert layer.spill_dir == str(tmp_path) and layer.sparse_state.cold.n > 0
    rep = model.memory_report(opt)
    assert rep["spilled"] == layer.sparse_state.cold.n * (8 + 4)
    ram = {k: v for k, v in rep.items() if k not in ("total", "spilled", "dense_equivalent", "ratio")}
    assert rep["total"] == sum(ram.values())
    assert "(on disk, not in total)" in str(rep)
    assert model.stats()["total"]["spilled"] == layer.sparse_state.cold.n
