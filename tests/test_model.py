"""SparseModel: layer selection, naming, meta-device build, the attach/refresh hook,
stats(), memory_report(), a digits MLP that learns, and a >100 GB dense-equivalent
model trained, refreshed and checkpointed on one CPU."""
from __future__ import annotations

import math
import os
import runpy
import time

import pytest
import torch
from torch import nn

import sparsecore as sc

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")


# ------------------------------------------------------------------ helpers

class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    """Candidates: stem, proj, blocks.{0,1}.fc{1,2}, head. Not candidates: the
    grouped conv, the reflect-padded conv, the 'same'-padded conv."""

    def __init__(self, d=24, h=32):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(6, 6, 3, padding="same")
        self.proj = nn.Linear(6 * 2 * 2, d)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(2)])
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.same(self.reflect(self.grouped(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        x = self.proj(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


CANDIDATES = {"stem", "proj", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2",
              "head"}


def _mlp(d_in=20, h=40, d_out=6):
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, d_out))


def _tensors(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _opt_tensors(opt) -> list:
    """Optimizer state tensors in parameter order (comparable across two optimizers)."""
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            out.append({k: v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def _train_step(model, opt, x, target):
    loss = nn.functional.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _k(n, s):
    return max(1, round((1.0 - s) * n))


# ------------------------------------------------------------------ selection and names

def test_replaces_exactly_the_candidates():
    torch.manual_seed(0)
    net = Net()
    model = sc.SparseModel(net, forward_sparsity=0.8, backward_sparsity=0.5)
    sparse = model.sparse_layers()
    assert set(sparse) == CANDIDATES
    assert isinstance(sparse["stem"], sc.TopKASTConv2d)
    for n in CANDIDATES - {"stem"}:
        assert type(sparse[n]) is sc.TopKASTLinear, n
    # non-candidate convolutions and every other module stay what they were
    assert type(net.grouped) is nn.Conv2d and type(net.reflect) is nn.Conv2d
    assert type(net.same) is nn.Conv2d and type(net.bn) is nn.BatchNorm2d
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("include, exclude, expect", [
    (["blocks.*"], (), {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}),
    (None, ["head", "stem"], CANDIDATES - {"head", "stem"}),
    (["blocks.*"], ["*.fc2"], {"blocks.0.fc1", "blocks.1.fc1"}),
    (["head", "proj"], (), {"head", "proj"}),
    (["blocks.?.fc1"], (), {"blocks.0.fc1", "blocks.1.fc1"}),
])
def test_include_exclude_patterns(include, exclude, expect):
    torch.manual_seed(0)
    net = Net()
    model = sc.SparseModel(net, forward_sparsity=0.8, backward_sparsity=0.5,
                           include=include, exclude=exclude)
    assert set(model.sparse_layers()) == expect
    for name in CANDIDATES - expect:   # untouched layers are still dense
        m = net.get_submodule(name)
        assert type(m) in (nn.Linear, nn.Conv2d), name


def test_names_and_state_dict_keys_kept():
    torch.manual_seed(0)
    net = Net()
    dense_keys = set(net.state_dict())
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model = sc.SparseModel(net, forward_sparsity=0.8, backward_sparsity=0.5, exclude=["head"])
    keys = set(model.state_dict())
    # SparseModel's own entry (step count and statistics), then the wrapped module's
    assert "_extra_state" in keys
    keys.discard("_extra_state")
    assert all(k.startswith("module.") for k in keys)
    # every parameter/buffer of a module that stayed dense keeps its name and value
    kept = {k for k in dense_keys if k.rsplit(".", 1)[0] not in CANDIDATES - {"head"}}
    for k in kept:
        assert "module." + k in keys, k
        assert torch.equal(model.state_dict()["module." + k], original[k]), k
    # a replaced layer keeps its name, its bias, and gains the sparse state
    for n in CANDIDATES - {"head"}:
        assert "module." + n + ".weight" not in keys
        for suffix in ("values", "bias", "a_indptr", "a_cols", "x_indptr", "x_cols",
                       "reserve_idx", "reserve_val", "floor", "key"):
            assert f"module.{n}.{suffix}" in keys, (n, suffix)
        assert torch.equal(model.state_dict()[f"module.{n}.bias"], original[n + ".bias"])
    # parameters are reachable by their qualified names
    names = dict(model.named_parameters())
    assert names["module.blocks.1.fc2.values"] is model.module.blocks[1].fc2.values


def test_overrides_set_per_layer_sparsities():
    torch.manual_seed(0)
    net = Net()
    model = sc.SparseModel(net, forward_sparsity=0.8, backward_sparsity=0.5, overrides={
        "blocks.*.fc1": {"forward_sparsity": 0.95, "backward_sparsity": 0.9},
        "blocks.1.fc1": {"forward_sparsity": 0.6, "backward_sparsity": 0.3},  # last wins
        "head": {"exploration": 0.5, "reserve": 0.0},
    })
    expect = {n: (0.8, 0.5) for n in CANDIDATES}
    expect["blocks.0.fc1"] = (0.95, 0.9)
    expect["blocks.1.fc1"] = (0.6, 0.3)
    for n, l in model.sparse_layers().items():
        sf, sb = expect[n]
        assert (l.forward_sparsity, l.backward_sparsity) == (sf, sb), n
        n_tot = l.in_features * l.out_features
        assert l.k_a == _k(n_tot, sf) and l.k_b == max(l.k_a, _k(n_tot, sb)), n
        assert l.active_indices().numel() == l.k_a and l.values.numel() == l.k_b
    head = model.module.head
    assert head.exploration == 0.5 and head.reserve == 0.0
    assert model.module.proj.exploration == 1e-4


# ------------------------------------------------------------------ errors

def _build(net=None, **kw):
    cfg = dict(forward_sparsity=0.8, backward_sparsity=0.5)
    cfg.update(kw)
    return sc.SparseModel(Net() if net is None else net, **cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(include=["blocks.*.fc3"]), "blocks.\\*.fc3"),
    (dict(exclude=["tail"]), "tail"),
    (dict(overrides={"nothing*": {"forward_sparsity": 0.9}}), "nothing"),
    (dict(include=["grouped"]), "grouped"),      # not a candidate (groups=2)
    (dict(include=["reflect"]), "reflect"),      # not a candidate (padding_mode)
])
def test_unknown_pattern_lists_candidates(kw, match):
    net = Net()
    before = _tensors(net)
    with pytest.raises(ValueError, match=match) as e:
        _build(net, **kw)
    msg = str(e.value)
    for c in ("blocks.0.fc1", "head", "stem"):
        assert c in msg, msg
    # nothing was half-applied
    assert not any(isinstance(m, sc.TopKASTLinear) for m in net.modules())
    _assert_same_state(before, _tensors(net))


def test_no_matching_layer():
    with pytest.raises(ValueError, match="no layer"):
        _build(include=["head"], exclude=["head"])
    with pytest.raises(ValueError, match="no layer"):
        _build(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="single layer"):
        _build(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="list of patterns"):
        _build(include="head")


@pytest.mark.parametrize("sf, sb, exc", [
    (1.0, 0.5, ValueError), (-0.1, 0.0, ValueError), (0.5, 0.6, ValueError),
    (0.5, -0.1, ValueError), (float("nan"), 0.1, TypeError), ("0.5", 0.1, TypeError),
])
def test_bad_sparsities(sf, sb, exc):
    with pytest.raises(exc, match="sparsity"):
        _build(forward_sparsity=sf, backward_sparsity=sb)


def test_bad_override():
    with pytest.raises(ValueError, match="blocks.0.fc2"):
        _build(overrides={"blocks.0.fc2": {"forward_sparsity": 0.5, "backward_sparsity": 0.7}})
    with pytest.raises(ValueError, match="lr"):
        _build(overrides={"head": {"lr": 0.1}})


@pytest.mark.parametrize("every", [0, -3, 2.5, True, None])
def test_bad_refresh_every(every):
    with pytest.raises(ValueError, match="refresh_every"):
        _build(refresh_every=every)


def test_not_a_module():
    with pytest.raises(TypeError):
        sc.SparseModel("net", forward_sparsity=0.5, backward_sparsity=0.5)
    model = _build(_mlp())
    with pytest.raises(TypeError, match="already"):
        sc.SparseModel(model, forward_sparsity=0.5, backward_sparsity=0.5)


def test_attach_errors():
    torch.manual_seed(0)
    model = _build(_mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert model.attach(opt) is model
    with pytest.raises(ValueError, match="already attached"):
        model.attach(opt)
    stranger = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="none of this model's sparse"):
        model.attach(stranger)
    dense_only = torch.optim.SGD([model.module[0].bias], lr=0.1)
    with pytest.raises(ValueError, match="none of this model's sparse"):
        model.attach(dense_only)
    with pytest.raises(TypeError, match="Optimizer"):
        model.attach([p for p in model.parameters()])
    # a second optimizer sharing (some) parameters with the first
    sharing = torch.optim.SGD([model.module[2].values], lr=0.1)
    with pytest.raises(ValueError, match="shares parameters"):
        model.attach(sharing)


def test_two_disjoint_optimizers_refresh_their_own_layers():
    torch.manual_seed(0)
    model = sc.SparseModel(_mlp(), forward_sparsity=0.8, backward_sparsity=0.5,
                           refresh_every=2, exploration=0.5)
    first = list(model.module[0].parameters())
    first_ids = {id(p) for p in first}
    rest = [p for p in model.parameters() if id(p) not in first_ids]
    opt_a = torch.optim.SGD(first, lr=0.1)
    opt_b = torch.optim.SGD(rest, lr=0.1)
    model.attach(opt_a).attach(opt_b)
    x, t = torch.randn(8, 20), torch.randn(8, 6)
    for _ in range(4):
        opt_a.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt_a.step()
    refreshes = {n: s["refreshes"] for n, s in model.stats()["layers"].items()}
    assert refreshes == {"0": 2, "2": 0, "4": 0}
    assert model.step_count == 4          # the first attached optimizer's count
    for _ in range(2):
        opt_b.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt_b.step()
    refreshes = {n: s["refreshes"] for n, s in model.stats()["layers"].items()}
    assert refreshes == {"0": 2, "2": 1, "4": 1}
    assert model.step_count == 4


# ------------------------------------------------------------------ seeds

def _meta_net():
    with torch.device("meta"):
        return Net()


def test_same_seed_same_model_other_seed_differs():
    a = sc.SparseModel(_meta_net(), forward_sparsity=0.8, backward_sparsity=0.5, seed=11)
    b = sc.SparseModel(_meta_net(), forward_sparsity=0.8, backward_sparsity=0.5, seed=11)
    c = sc.SparseModel(_meta_net(), forward_sparsity=0.8, backward_sparsity=0.5, seed=12)
    sa, sb, scc = _tensors(a), _tensors(b), _tensors(c)
    _assert_same_state(sa, sb)
    # another seed: different sparse values and sets, different dense initialisation
    assert not torch.equal(sa["module.proj.values"], scc["module.proj.values"])
    assert not torch.equal(a.module.proj.active_indices(), c.module.proj.active_indices())
    assert not torch.equal(sa["module.grouped.weight"], scc["module.grouped.weight"])
    assert not torch.equal(sa["module.proj.bias"], scc["module.proj.bias"])
    # layers of the same shape inside one model get different keys
    assert not torch.equal(sa["module.blocks.0.fc1.values"], sa["module.blocks.1.fc1.values"])


def test_build_does_not_touch_global_rng():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    sc.SparseModel(_meta_net(), forward_sparsity=0.8, backward_sparsity=0.5, seed=3)
    assert torch.equal(before, torch.random.get_rng_state())


# ------------------------------------------------------------------ meta device

class MetaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(self.ln(torch.relu(self.fc(x))))


def test_meta_build_materialises_dense_parts():
    with torch.device("meta"):
        net = MetaNet()
    assert all(p.is_meta for p in net.parameters())
    model = sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.5,
                           exclude=["head", "conv2"])
    assert set(model.sparse_layers()) == {"conv", "fc"}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu" and not t.is_meta, n
        if t.is_floating_point():
            assert torch.isfinite(t).all(), n
    # dense layers got their module's default initialisation (non-zero, right scale)
    for m in (model.module.head, model.module.conv2):
        fan_in = m.weight[0].numel()
        assert m.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
        assert m.weight.std() > 0.2 / math.sqrt(fan_in)
        assert m.bias.abs().sum() > 0
    bn, ln = model.module.bn, model.module.ln
    assert torch.equal(bn.running_mean, torch.zeros(8))
    assert torch.equal(bn.running_var, torch.ones(8))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))
    assert torch.equal(ln.weight, torch.ones(32)) and torch.equal(ln.bias, torch.zeros(32))
    # the sparse layers' biases are initialised too
    for l in model.sparse_layers().values():
        assert l.bias.abs().sum() > 0 and torch.isfinite(l.bias).all()
    # it trains
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach(opt)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    assert int(bn.num_batches_tracked) == 2


def test_meta_parameter_without_reset_parameters_raises():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(16))
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.fc(x) * self.scale)

    with torch.device("meta"):
        net = Custom()
    with pytest.raises(ValueError, match="Custom.*reset_parameters"):
        sc.SparseModel(net, forward_sparsity=0.5, backward_sparsity=0.5, exclude=["out"])
    # nothing was half-applied
    assert type(net.fc) is nn.Linear and net.fc.weight.is_meta and net.out.weight.is_meta


def test_build_inside_meta_context():
    """Writing the whole construction inside ``with torch.device("meta")`` must still
    give a CPU model (the sparse layers allocate their own CPU storage) or refuse
    clearly; it must not produce a model that fails at its first forward."""
    with torch.device("meta"):
        model = sc.SparseModel(nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12),
                                             nn.Linear(12, 3)),
                               forward_sparsity=0.5, backward_sparsity=0.5)
    bad = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_meta]
    assert not bad, f"tensors left on the meta device: {bad}"
    assert torch.isfinite(model(torch.randn(2, 10))).all()


# ------------------------------------------------------------------ attach / refresh

def _pair_of_models(refresh_every, seed=4, **kw):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(sc.SparseModel(_mlp(), forward_sparsity=0.8, backward_sparsity=0.5,
                                     refresh_every=refresh_every, exploration=0.3, seed=seed,
                                     **kw))
    return models


def test_refresh_every_n_optimizer_steps():
    torch.manual_seed(1)
    model = _pair_of_models(3)[0]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.attach(opt)
    initial = {n: l.active_indices().clone() for n, l in model.sparse_layers().items()}
    assert model.step_count == 0
    x, t = torch.randn(16, 20), torch.randn(16, 6)
    for k in range(1, 11):
        _train_step(model, opt, x, t)
        with torch.no_grad():       # forward passes alone never count
            model(x)
        assert model.step_count == k
        for n, s in model.stats()["layers"].items():
            assert s["refreshes"] == k // 3, (k, n)
    changed = [n for n, l in model.sparse_layers().items()
               if not torch.equal(l.active_indices(), initial[n])]
    assert changed, "training with refreshes must move some active set"
    # detaching stops the refreshes
    model.detach_optimizer(opt)
    for _ in range(3):
        _train_step(model, opt, x, t)
    assert all(s["refreshes"] == 3 for s in model.stats()["layers"].values())


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=0.05),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
], ids=["adam", "momentum"])
def test_attach_equals_manual_refresh(make_opt):
    hooked, manual = _pair_of_models(2)
    _assert_same_state(_tensors(hooked), _tensors(manual))
    opt_h, opt_m = make_opt(hooked.parameters()), make_opt(manual.parameters())
    hooked.attach(opt_h)
    g = torch.Generator().manual_seed(3)
    for k in range(1, 8):
        x, t = torch.randn(16, 20, generator=g), torch.randn(16, 6, generator=g)
        _train_step(hooked, opt_h, x, t)
        _train_step(manual, opt_m, x, t)
        if k % 2 == 0:
            for l in manual.sparse_layers().values():
                l.refresh(opt_m)
    _assert_same_state(_tensors(hooked), _tensors(manual))
    for a, b in zip(_opt_tensors(opt_h), _opt_tensors(opt_m)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert [s["refreshes"] for s in hooked.stats()["layers"].values()] == [3, 3, 3]


def test_refresh_nan_changes_no_layer():
    torch.manual_seed(0)
    model = _pair_of_models(100)[0]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.attach(opt)
    _train_step(model, opt, torch.randn(8, 20), torch.randn(8, 6))
    with torch.no_grad():
        model.module[4].values[0] = float("nan")   # the last layer is bad
    before = _tensors(model)
    opt_before = _opt_tensors(opt)
    with pytest.raises(sc.RefreshError, match="4"):
        model.refresh()
    after = _tensors(model)
    for k in before:
        assert torch.equal(before[k].nan_to_num(), after[k].nan_to_num()), k
    for a, b in zip(opt_before, _opt_tensors(opt)):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert all(s["refreshes"] == 0 for s in model.stats()["layers"].values())


# ------------------------------------------------------------------ stats

def test_stats_consistent_with_layers():
    torch.manual_seed(2)
    model = sc.SparseModel(_mlp(), forward_sparsity=0.8, backward_sparsity=0.5, refresh_every=1,
                           exploration=0.5, reserve=0.0, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.attach(opt)
    layers = model.sparse_layers()
    entered = dict.fromkeys(layers, 0)
    last_changed_a = dict.fromkeys(layers, 0.0)
    scans = {n: l.stats["replenishes"] for n, l in layers.items()}
    assert all(v >= 1 for v in scans.values())   # the construction scan
    saw_entry = False
    for step in range(6):
        old_a = {n: set(l.active_indices().tolist()) for n, l in layers.items()}
        old_b = {n: set(l.backward_indices().tolist()) for n, l in layers.items()}
        _train_step(model, opt, torch.randn(16, 20) * 3, torch.randn(16, 6) * 3)  # refreshes
        for n, l in layers.items():
            new_a = set(l.active_indices().tolist())
            last_changed_a[n] = 1 - len(old_a[n] & new_a) / l.k_a
            entered[n] += len(new_a - old_b[n])
        saw_entry |= any(v > 0 for v in entered.values())
    st = model.stats()
    assert set(st["layers"]) == set(layers)
    for n, l in layers.items():
        s = st["layers"][n]
        n_tot = l.in_features * l.out_features
        assert s["nnz_a"] == l.active_indices().numel() == _k(n_tot, 0.8)
        assert s["nnz_b"] == l.backward_indices().numel() == max(s["nnz_a"], _k(n_tot, 0.5))
        assert s["pool"] == s["nnz_b"] + l.sparse_state.n_reserve
        assert s["dense_equivalent"] == n_tot
        assert 0.0 <= s["changed_a"] <= 1.0 and 0.0 <= s["changed_b"] <= 1.0
        assert s["changed_a"] == pytest.approx(last_changed_a[n], abs=1e-12), n
        assert s["entered_a_from_outside_b"] == entered[n], n
        assert s["refreshes"] == 6
        assert s["replenishes"] == l.stats["replenishes"] >= scans[n]
    assert saw_entry, "the test must see coordinates enter A from outside B"
    assert sum(s["replenishes"] for s in st["layers"].values()) > sum(scans.values()), \
        "reserve=0 must force replenishing scans"
    tot = st["total"]
    for key in ("nnz_a", "nnz_b", "pool", "dense_equivalent", "entered_a_from_outside_b",
                "replenishes"):
        assert tot[key] == sum(s[key] for s in st["layers"].values()), key
    weighted = sum(s["changed_a"] * s["nnz_a"] for s in st["layers"].values()) / tot["nnz_a"]
    assert tot["changed_a"] == pytest.approx(weighted)
    assert tot["step_count"] == 6 == model.step_count


# ------------------------------------------------------------------ memory report

def _bytes(t):
    return t.numel() * t.element_size()


def test_memory_report_matches_tensors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 400), nn.LayerNorm(400), nn.ReLU(),
                        nn.Linear(400, 300), nn.BatchNorm1d(300), nn.Linear(300, 10))
    model = sc.SparseModel(net, forward_sparsity=0.99, backward_sparsity=0.98,
                           exclude=["5"])
    sparse = model.sparse_layers()
    sparse_ids = {id(l.values) for l in sparse.values()}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    k_b_total = sum(max(_k(l.n_total, 0.99), _k(l.n_total, 0.98)) for l in sparse.values())
    dense_bytes = sum(_bytes(p) for p in dense)
    bn = net[4]
    buffer_bytes = sum(_bytes(b) for b in (bn.running_mean, bn.running_var,
                                           bn.num_batches_tracked))

    rep = model.memory_report()   # no optimizer yet: two Adam-like states assumed
    assert isinstance(rep, sc.MemoryReport) and isinstance(rep, dict)
    assert rep["values"] == k_b_total * 4 == rep["gradients"]
    assert rep["dense_parameters"] == dense_bytes == rep["dense_gradients"]
    assert rep["buffers"] == buffer_bytes
    assert rep["optimizer_state"] == 2 * (k_b_total * 4 + dense_bytes)
    reserve = sum(_bytes(l.sparse_state.reserve_idx) + _bytes(l.sparse_state.reserve_val) for l in sparse.values())
    assert rep["reserve"] == reserve
    index = sum(_bytes(getattr(l.sparse_state, b)) for l in sparse.values()
                for b in ("a_indptr", "a_cols", "x_indptr", "x_cols", "at_indptr", "at_rows",
                          "at_perm"))
    assert rep["indices"] == index
    dense_eq = 4 * (sum(l.out_features * l.in_features * 4 for l in sparse.values())
                    + dense_bytes) + buffer_bytes
    assert rep["dense_equivalent"] == dense_eq
    parts = ("values", "gradients", "indices", "reserve", "optimizer_state",
             "dense_parameters", "dense_gradients", "buffers")
    assert rep["total"] == sum(rep[k] for k in parts)
    assert rep["ratio"] == pytest.approx(rep["total"] / dense_eq)
    assert rep["ratio"] < 0.1

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.attach(opt)
    assert model.memory_report()["optimizer_state"] == 0   # Adam allocates lazily
    _train_step(model, opt, torch.randn(8, 300), torch.randn(8, 10))
    actual = sum(_bytes(t) for st in opt.state.values() for t in st.values()
                 if torch.is_tensor(t))
    assert actual >= 2 * (k_b_total * 4 + dense_bytes)
    rep = model.memory_report()
    assert rep["optimizer_state"] == actual
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert model.memory_report(optimizer=sgd)["optimizer_state"] == 0

    text = str(rep)
    lines = text.splitlines()
    assert len(lines) >= len(parts) + 3
    for k in parts + ("total", "dense equivalent"):
        assert any(line.startswith(k) for line in lines), k
    assert "%" in lines[-1]


# ------------------------------------------------------------------ learning

def test_digits_mlp_example_learns(capsys):
    """examples/digits_mlp.py: an MLP at forward 0.9 / backward 0.8 sparsity on
    sklearn's bundled digits reaches a high test accuracy in a few seconds."""
    pytest.importorskip("sklearn")
    ns = runpy.run_path(os.path.join(EXAMPLES, "digits_mlp.py"))
    t0 = time.perf_counter()
    acc = ns["main"](seed=0)
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert f"test accuracy {acc:.4f}" in out
    assert acc >= 0.9, out
    print(f"digits: accuracy {acc:.4f} in {elapsed:.1f}s")


def test_digits_other_seed_also_learns():
    pytest.importorskip("sklearn")
    ns = runpy.run_path(os.path.join(EXAMPLES, "digits_mlp.py"))
    assert ns["main"](seed=3, verbose=False) >= 0.9


# ------------------------------------------------------------------ beyond memory

HUGE_IN, HUGE_HID = 120_000, 105_000       # 2 layers: 2.52e10 weights = 100.8 GB in float32


def _huge_model(seed):
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(HUGE_IN, HUGE_HID), nn.ReLU(),
                            nn.Linear(HUGE_HID, HUGE_IN))
    return sc.SparseModel(net, forward_sparsity=0.99999, backward_sparsity=0.99998,
                          refresh_every=3, seed=seed)


@pytest.mark.slow
def test_model_beyond_100gb_trains_refreshes_and_checkpoints(tmp_path):
    dense_weights = 2 * HUGE_IN * HUGE_HID
    assert dense_weights * 4 > 100e9
    t0 = time.perf_counter()
    model = _huge_model(seed=7)
    t_build = time.perf_counter() - t0
    # lr tiny against the spread of the initial magnitudes inside B (~1e-7): the
    # refresh then needs no second full scan, yet A and B still change
    opt = torch.optim.AdamW(model.parameters(), lr=1e-8)
    model.attach(opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, HUGE_IN, generator=g)
    before_a = {n: l.active_indices().clone() for n, l in model.sparse_layers().items()}
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    st = model.stats()
    assert st["total"]["dense_equivalent"] == dense_weights
    assert all(s["refreshes"] == 1 for s in st["layers"].values())
    assert st["total"]["changed_b"] > 0
    assert any(not torch.equal(before_a[n], l.active_indices())
               for n, l in model.sparse_layers().items())
    rep = model.memory_report()
    assert rep["dense_equivalent"] >= 4 * dense_weights * 4
    assert rep["total"] < 1e-3 * rep["dense_equivalent"]
    assert rep["total"] < 200e6
    path = tmp_path / "huge.sparsecore"
    sc.save(model, path, optimizer=opt, extra={"note": "huge"})
    assert os.path.getsize(path) < 100e6

    t1 = time.perf_counter()
    fresh = _huge_model(seed=7)                     # a second, identical build
    t_build2 = time.perf_counter() - t1
    assert not torch.equal(fresh.module[0].values, model.module[0].values)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-8)
    fresh.attach(opt2)
    assert sc.load(path, fresh, optimizer=opt2) == {"note": "huge"}
    _assert_same_state(_tensors(model), _tensors(fresh))
    for a, b in zip(_opt_tensors(opt), _opt_tensors(opt2)):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert fresh.step_count == 3
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    print(f"huge: builds {t_build:.1f}s + {t_build2:.1f}s, total {time.perf_counter() - t0:.1f}s")
