"""SparseState: one immutable sparse structure per layer; casts, devices, state_dict."""
from __future__ import annotations

import pytest
import torch

import sparsecore as sc
from sparsecore.state import SparseState


def _layer(**kw):
    kw.setdefault("forward_sparsity", 0.9)
    kw.setdefault("backward_sparsity", 0.8)
    return sc.TopKASTLinear(48, 32, seed=2, **kw)


def _snapshot(st: SparseState) -> dict:
    return {k: v.clone() for k, v in st.tensors().items()}


def test_no_registered_buffers():
    # DDP broadcasts registered buffers every step: the sparse state must not be one
    layer = _layer()
    assert list(layer.buffers()) == []
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]


def test_float_cast_keeps_indices_and_floor_and_state_dict_loads():
    layer = _layer(dtype=torch.float64)
    theta64 = layer.to_dense()
    before = _snapshot(layer.sparse_state)
    layer.float()
    st = layer.sparse_state
    assert layer.values.dtype == torch.float32 and st.reserve_val.dtype == torch.float32
    for n in ("a_indptr", "x_indptr", "reserve_idx"):
        assert getattr(st, n).dtype == torch.int64 and torch.equal(getattr(st, n), before[n])
    assert st.a_cols.dtype == torch.int32 and st.at_rows.dtype == torch.int32
    assert st.at_perm.dtype == torch.int32
    assert st.tensors()["floor"].dtype == torch.float64
    assert st.floor == float(before["floor"])
    torch.testing.assert_close(layer.to_dense(), theta64.float(), rtol=0, atol=0)
    fresh = _layer(dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())   # failed before: floor had been cast
    assert torch.equal(fresh.to_dense(), layer.to_dense())
    layer.double()
    assert layer.sparse_state.reserve_val.dtype == torch.float64


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                                  lambda m: m.to(torch.float16)])
def test_unsupported_dtype_refused_and_nothing_changed(cast):
    layer = _layer()
    st, v = layer.sparse_state, layer.values.detach().clone()
    with pytest.raises(TypeError, match=r"TopKASTLinear\(48, 32\).*float16|bfloat16"):
        cast(layer)
    assert layer.sparse_state is st and layer.values.dtype == torch.float32
    assert torch.equal(layer.values.detach(), v)


def test_cast_inside_a_model_reaches_the_state():
    net = torch.nn.Sequential(_layer(), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    net.double()
    assert net[0].sparse_state.reserve_val.dtype == torch.float64
    assert net[0](torch.randn(3, 48, dtype=torch.float64)).dtype == torch.float64


def test_to_same_device_is_identity():
    layer = _layer()
    st = layer.sparse_state
    layer.to("cpu")
    assert layer.sparse_state is st


def test_refresh_installs_a_new_state_and_never_mutates_the_old():
    layer = _layer(reserve=0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    old = layer.sparse_state
    snap = _snapshot(old)
    x, t = torch.randn(16, 48), torch.randn(16, 32)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) - t).pow(2).sum().backward()
        opt.step()
    info = layer.refresh(opt)
    assert info["changed_a"] > 0
    assert layer.sparse_state is not old
    for k, v in old.tensors().items():
        assert torch.equal(v, snap[k]), k
    with pytest.raises(Exception):
        old.floor = 0.0     # frozen


def test_state_dict_round_trip_and_validation_leaves_layer_unchanged():
    src = _layer()
    opt = torch.optim.Adam(src.parameters(), lr=0.1)
    x = torch.randn(8, 48)
    for _ in range(2):
        opt.zero_grad()
        src(x).sum().backward()
        opt.step()
    src.refresh(opt)
    sd = src.state_dict()
    dst = _layer()
    before = _snapshot(dst.sparse_state)
    bad = dict(sd)
    bad["reserve_idx"] = torch.cat([sd["reserve_idx"], sd["reserve_idx"][:1]])
    bad["reserve_val"] = torch.cat([sd["reserve_val"], sd["reserve_val"][:1]])
    with pytest.raises(RuntimeError, match="reserve"):
        dst.load_state_dict(bad)
    for k, v in dst.sparse_state.tensors().items():
        assert torch.equal(v, before[k])
    dst.load_state_dict(sd)
    assert torch.equal(dst.to_dense(), src.to_dense())
    assert dst.stats["refreshes"] == 1      # statistics travel in the state_dict


@pytest.mark.parametrize("shape", [((1 << 31), 1), (1, (1 << 31))])
def test_int32_index_overflow_guard(shape):
    in_f, out_f = shape
    with pytest.raises(ValueError, match="int32 index range"):
        sc.TopKASTLinear(in_f, out_f, forward_sparsity=0.999999, backward_sparsity=0.999998)


def _spilled_layer(tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    layer = _layer(reserve=0.0, exploration=0.0, dtype=dtype, spill_dir=str(tmp_path))
    opt = torch.optim.AdamW(layer.parameters(), lr=0.3, weight_decay=0.5)
    for _ in range(6):
        opt.zero_grad()
        layer(torch.randn(8, 48, dtype=dtype)).pow(2).sum().backward()
        opt.step()
        layer.refresh(opt)
    assert layer.sparse_state.cold.n > 0, "the test needs spilled entries"
    return layer


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["cold_idx"].__setitem__(0, int(sd["reserve_idx"][0]))
     if sd["reserve_idx"].numel() else sd["cold_idx"].__setitem__(0, int(sd["a_cols"][0])),
     "cold|overlap"),
    (lambda sd: sd["cold_idx"].__setitem__(1, int(sd["cold_idx"][0])), "not sorted"),
    (lambda sd: sd["cold_val"].__setitem__(0, float(sd["floor"]) * 2), "not below the floor"),
    (lambda sd: sd["cold_val"].__setitem__(0, float("nan")), "NaN"),
    (lambda sd: sd.__setitem__("cold_val", sd["cold_val"][1:]), "differ in shape"),
])
def test_cold_entries_validated_before_anything_changes(tmp_path, corrupt, match):
    src = _spilled_layer(tmp_path / "a")
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in src.state_dict().items()}
    corrupt(sd)
    dst = _layer(reserve=0.0, exploration=0.0, spill_dir=str(tmp_path / "b"))
    before = dst.to_dense().clone()
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(sd)
    assert torch.equal(dst.to_dense(), before) and dst.sparse_state.cold.n == 0
    import gc
    gc.collect()
    assert not list((tmp_path / "b").glob("cold-*")) if (tmp_path / "b").exists() else True


def test_cold_store_follows_value_casts_and_old_checkpoints_load(tmp_path):
    layer = _spilled_layer(tmp_path)
    f32, v32 = (a.copy() for a in layer.sparse_state.cold.mapped())
    layer.double()
    f64, v64 = layer.sparse_state.cold.mapped()
    assert v64.dtype.name == "float64"
    assert (f64 == f32).all() and (v64 == v32.astype("float64")).all()
    sd = layer.state_dict()
    assert sd["cold_val"].dtype == torch.float64 and sd["cold_idx"].numel() == layer.stats["spilled"]
    old = {k: v for k, v in _layer(reserve=0.0).state_dict().items() if not k.startswith("cold")}
    fresh = _layer(reserve=0.0)
    fresh.load_state_dict(old)      # a checkpoint from before the cold tier: no cold entries
    assert fresh.sparse_state.cold.n == 0


def test_pickling_refused_only_with_spilled_entries(tmp_path):
    import copy
    import pickle
    plain = _layer()
    assert pickle.loads(pickle.dumps(plain)).sparse_state.cold.n == 0
    layer = _spilled_layer(tmp_path)
    with pytest.raises(TypeError, match="spilled entries cannot be pickled"):
        pickle.dumps(layer.sparse_state)
    twin = copy.deepcopy(layer)      # shares the immutable store
    assert twin.sparse_state.cold is layer.sparse_state.cold
    assert torch.equal(twin.to_dense(), layer.to_dense())
