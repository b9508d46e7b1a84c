"""Training loops as users write them: gradient accumulation, loss scaling, a layer
used twice, autocast, torch.compile, external per-coordinate state, and the
errors that keep a loop from silently doing something else."""
from __future__ import annotations

import pytest
import torch

import sparsecore as sc

from reference import DenseTopKAST

LAM, SF, SB = 0.5, 0.8, 0.6


def _pair(in_f=30, out_f=20, seed=3):
    layer = sc.TopKASTLinear(in_f, out_f, forward_sparsity=SF, backward_sparsity=SB,
                             exploration=LAM, seed=seed, dtype=torch.float64)
    ref = DenseTopKAST(layer.to_dense(), layer.bias.detach(), k_a=layer.k_a, k_b=layer.k_b,
                       exploration=LAM, density=1 - SF)
    return layer, ref


def _check(layer, ref, step):
    assert torch.equal(layer.active_indices(), ref.active_indices()), step
    assert torch.equal(layer.backward_indices(), ref.backward_indices()), step
    torch.testing.assert_close(layer.to_dense(), ref.theta.detach(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("wrapped", [False, True])
def test_gradient_accumulation_equals_full_batch(micro, wrapped):
    """k micro-batches of loss/k == one full batch of the dense reference: the
    exploration term enters once per optimizer step, not once per backward."""
    torch.manual_seed(0)
    if wrapped:
        with torch.device("meta"):
            net = torch.nn.Sequential(torch.nn.Linear(30, 20, dtype=torch.float64))
        model = sc.SparseModel(net, forward_sparsity=SF, backward_sparsity=SB, refresh_every=3,
                               exploration=LAM, verbose=False)
        layer = model.sparse_layers()["0"]
        ref = DenseTopKAST(layer.to_dense(), layer.bias.detach(), k_a=layer.k_a,
                           k_b=layer.k_b, exploration=LAM, density=1 - SF)
    else:
        layer, ref = _pair()
    opt_e = torch.optim.Adam(layer.parameters(), lr=0.05)
    opt_r = torch.optim.Adam(ref.parameters(), lr=0.05)
    if wrapped:
        model.attach(opt_e)
    for step in range(9):
        x = torch.randn(16, 30, dtype=torch.float64)
        target = torch.randn(16, 20, dtype=torch.float64)
        opt_e.zero_grad()
        for xs, ts in zip(x.chunk(micro), target.chunk(micro)):
            (torch.nn.functional.mse_loss(layer(xs), ts, reduction="sum") / 16).backward()
        opt_r.zero_grad()
        (torch.nn.functional.mse_loss(ref(x), target, reduction="sum") / 16).backward()
        opt_e.step()
        ref.step(opt_r)
        if step % 3 == 2:
            if not wrapped:
                layer.refresh(opt_e)
            ref.refresh(opt_r)
        _check(layer, ref, step)


def test_grad_scaler_and_double_use_match_reference():
    """A GradScaler-scaled loss and a layer applied twice in one forward give the
    reference's step: the term is added after unscaling, once."""
    torch.manual_seed(1)
    layer, ref = _pair(in_f=20, out_f=20)
    opt_e = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(6):
        x = torch.randn(8, 20, dtype=torch.float64)
        opt_e.zero_grad()
        scaler.scale(torch.tanh(layer(torch.tanh(layer(x)))).pow(2).mean()).backward()
        scaler.step(opt_e)
        scaler.update()
        opt_r.zero_grad()
        torch.tanh(ref(torch.tanh(ref(x)))).pow(2).mean().backward()
        ref.step(opt_r)
        if step % 2 == 1:
            layer.refresh(opt_e)
            ref.refresh(opt_r)
        _check(layer, ref, step)


def test_exploration_once_per_step_even_without_backward_data_term():
    """Two optimizers' steps on two layers: each layer's term comes from the
    optimizer that holds it, once per step of that optimizer."""
    a = sc.TopKASTLinear(10, 6, forward_sparsity=0.5, backward_sparsity=0.2, exploration=0.1)
    v0 = a.values.detach().clone()
    opt = torch.optim.SGD(a.parameters(), lr=1.0)
    a.values.grad = torch.zeros_like(a.values)
    opt.step()
    c = torch.full_like(v0, 0.1)
    c[a.k_a:] = 0.1 / 0.5
    torch.testing.assert_close(a.values.detach(), v0 - c * v0)


def test_autocast_bf16_runs_and_keeps_fp32_master_weights():
    torch.manual_seed(2)
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model = sc.SparseModel(net, forward_sparsity=0.5, backward_sparsity=0.3, verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.attach(opt)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        loss = y.float().pow(2).mean()
    assert y.dtype == torch.bfloat16
    loss.backward()
    opt.step()
    for layer in model.sparse_layers().values():
        assert layer.values.dtype == torch.float32 and layer.values.grad.dtype == torch.float32
    with torch.no_grad():
        ref = model(x)                       # fp32 forward of the same weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    layer = model.sparse_layers()["0"]
    with torch.autocast("cpu", dtype=torch.bfloat16):   # a bf16 input is accepted too
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_dtype_mismatch_outside_autocast_names_the_layer():
    layer = sc.TopKASTLinear(8, 4, forward_sparsity=0.5, backward_sparsity=0.5)
    with pytest.raises(TypeError, match=r"TopKASTLinear\(8, 4\).*bfloat16.*autocast"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))


def test_weight_attribute_gives_an_informative_error():
    layer = sc.TopKASTLinear(8, 4, forward_sparsity=0.5, backward_sparsity=0.5)
    with pytest.raises(AttributeError, match="no dense .weight.*values"):
        layer.weight
    assert not hasattr(layer, "weight")


def test_refresh_without_the_optimizer_holding_state_raises_and_changes_nothing():
    layer = sc.TopKASTLinear(12, 8, forward_sparsity=0.7, backward_sparsity=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 12)).sum().backward()
    opt.step()
    st, v = layer.sparse_state, layer.values.detach().clone()
    with pytest.raises(sc.RefreshError, match="Adam.*not passed to refresh"):
        layer.refresh()
    assert layer.sparse_state is st and torch.equal(layer.values.detach(), v)
    layer.refresh(opt)   # with it, fine


def test_refresh_hook_keeps_an_ema_aligned():
    torch.manual_seed(4)
    layer = sc.TopKASTLinear(24, 16, forward_sparsity=0.8, backward_sparsity=0.6, reserve=0.0)
    ema = layer.values.detach().clone()
    handle = layer.register_refresh_hook(lambda remap: remap(ema))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x, t = torch.randn(8, 24), torch.randn(8, 16)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), t).backward()
        opt.step()
        ema.mul_(0.5).add_(layer.values.detach(), alpha=0.5)
    old_order = torch.cat([layer.active_indices(), torch.from_numpy(layer.sparse_state.x_flat())])
    by_coord = dict(zip(old_order.tolist(), ema.tolist()))
    info = layer.refresh(opt)
    assert info["changed_b"] > 0 or info["changed_a"] > 0
    new_order = torch.cat([layer.active_indices(), torch.from_numpy(layer.sparse_state.x_flat())])
    expect = torch.tensor([by_coord.get(i, 0.0) for i in new_order.tolist()])
    torch.testing.assert_close(ema, expect, rtol=0, atol=0)
    handle.remove()
    before = ema.clone()
    layer.refresh(opt)
    assert torch.equal(ema, before)


def test_torch_compile_fullgraph_equals_eager_across_a_refresh(tmp_path, monkeypatch):
    # a private inductor cache: compiled graphs cached by another checkout (whose
    # custom ops may return other strides) must not be reused
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(5)

    def make():
        return torch.nn.Sequential(
            sc.TopKASTLinear(16, 24, forward_sparsity=0.8, backward_sparsity=0.6, seed=1),
            torch.nn.ReLU(),
            sc.TopKASTLinear(24, 4, forward_sparsity=0.8, backward_sparsity=0.6, seed=2))

    eager, comp = make(), make()
    compiled = torch.compile(comp, fullgraph=True)
    oe = torch.optim.AdamW(eager.parameters(), lr=0.05)
    oc = torch.optim.AdamW(comp.parameters(), lr=0.05)
    x, t = torch.randn(8, 16), torch.randn(8, 4)
    changed = 0.0
    for step in range(4):
        for net, opt in ((eager, oe), (compiled, oc)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), t)
            loss.backward()
            opt.step()
            if net is eager:
                le = loss.item()
        assert loss.item() == pytest.approx(le, rel=1e-6, abs=1e-7), step
        if step == 1:
            for net, opt in ((eager, oe), (comp, oc)):
                for m in net:
                    if isinstance(m, sc.TopKASTLinear):
                        changed += m.refresh(opt)["changed_a"]
    assert changed > 0, "the test must cross a refresh that changes A"


def test_param_groups_decay_sparse_values_like_matrices():
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8),
                                  torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model = sc.SparseModel(net, forward_sparsity=0.5, backward_sparsity=0.3, verbose=False)
    assert "param_groups" in model.summary()
    # a dimension-based recipe (nanoGPT) misses the sparse weights ...
    by_dim = {id(p) for p in model.parameters() if p.dim() >= 2}
    values = [l.values for l in model.sparse_layers().values()]
    assert not any(id(v) in by_dim for v in values)
    # ... param_groups puts them with the matrices
    decay, rest = sc.param_groups(model, weight_decay=0.1)
    ids = {id(p) for p in decay["params"]}
    assert ids == by_dim | {id(v) for v in values}
    assert {id(p) for p in rest["params"]} == {id(p) for p in model.parameters()} - ids
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    torch.optim.AdamW(sc.param_groups(model, 0.1), lr=1e-3)   # accepted by torch
    with pytest.raises(ValueError, match="weight_decay"):
        sc.param_groups(model, -1.0)
