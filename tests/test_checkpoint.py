"""sc.save / sc.load: bit-identical resume, validation before any change, corrupt
files, and no pickle anywhere."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from torch import nn

import sparsecore as sc

REFRESH_EVERY = 3

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.02),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.02, amsgrad=True),
}


def _net(hidden=40, dtype=torch.float32):
    return nn.Sequential(nn.Linear(20, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 6)).to(dtype)


def _build(hidden=40, sf=0.8, sb=0.5, opt="adam", attach=True, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(forward_sparsity=sf, backward_sparsity=sb, refresh_every=REFRESH_EVERY,
               exploration=0.3, seed=1, reserve=0.1)
    cfg.update(kw)
    model = sc.SparseModel(_net(hidden, dtype), **cfg)
    optimizer = OPTIMIZERS[opt](model.parameters())
    if attach:
        model.attach(optimizer)
    return model, optimizer


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 20, generator=g), torch.randn(16, 6, generator=g)


def _train(model, opt, start, stop):
    dtype = next(model.parameters()).dtype
    for step in range(start, stop):
        x, t = (v.to(dtype) for v in _batch(step))
        loss = nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _opt_state(opt):
    """(per-parameter state in parameter order, param_groups without params)."""
    state = []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            state.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return state, groups


def _assert_models_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _assert_opts_equal(a, b):
    (sa, ga), (sb, gb) = a, b
    assert ga == gb
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def _snapshot(model, opt):
    return _model_state(model), _opt_state(opt)


def _assert_unchanged(model, opt, snap):
    _assert_models_equal(snap[0], _model_state(model))
    _assert_opts_equal(snap[1], _opt_state(opt))


@pytest.fixture
def trained(tmp_path):
    """A model trained 5 steps (one refresh done, the next one due at step 6),
    saved with its Adam optimizer."""
    model, opt = _build()
    _train(model, opt, 0, 5)
    path = tmp_path / "ckpt.sparsecore"
    sc.save(model, path, optimizer=opt, extra={"step": 5})
    return model, opt, path


# ------------------------------------------------------------------ resume

@pytest.mark.parametrize("opt_name, stop_at", [
    ("adam", 4), ("adam", 6), ("momentum", 4), ("momentum", 6), ("sgd", 5),
    ("adamw-amsgrad", 5)])
def test_resume_is_bit_identical(tmp_path, opt_name, stop_at):
    """Stopping before (4, 5) or right at (6) a refresh step and resuming in a fresh
    model and optimizer gives exactly the uninterrupted run."""
    total = 11
    ref_model, ref_opt = _build(opt=opt_name)
    _train(ref_model, ref_opt, 0, total)

    model, opt = _build(opt=opt_name)
    _train(model, opt, 0, stop_at)
    path = tmp_path / "ckpt.sparsecore"
    sc.save(model, path, optimizer=opt)
    del model, opt

    resumed, ropt = _build(opt=opt_name)            # a fresh process would do exactly this
    assert sc.load(path, resumed, optimizer=ropt) is None
    assert resumed.step_count == stop_at
    _train(resumed, ropt, stop_at, total)

    assert resumed.step_count == ref_model.step_count == total
    _assert_models_equal(_model_state(ref_model), _model_state(resumed))
    _assert_opts_equal(_opt_state(ref_opt), _opt_state(ropt))


def test_stats_counters_survive_resume(tmp_path):
    """stats() of a resumed run reports the same cumulative counters (refreshes,
    scans, entries into A from outside B) as the uninterrupted run."""
    ref_model, ref_opt = _build()
    _train(ref_model, ref_opt, 0, 8)
    model, opt = _build()
    _train(model, opt, 0, 4)
    path = tmp_path / "ckpt.sparsecore"
    sc.save(model, path, optimizer=opt)
    resumed, ropt = _build()
    sc.load(path, resumed, optimizer=ropt)
    _train(resumed, ropt, 4, 8)
    assert resumed.stats() == ref_model.stats()


def test_load_before_attach_keeps_the_refresh_schedule(trained):
    """Loading first and attaching afterwards is a natural order; the restored
    step count must still decide when the next refresh happens (the checkpoint
    was taken at step 5, so the next refresh is due after step 6)."""
    src, src_opt, path = trained
    model, opt = _build(attach=False)
    sc.load(path, model, optimizer=opt)
    model.attach(opt)
    assert model.step_count == 5
    _train(model, opt, 5, 6)
    assert all(s["refreshes"] == 2 for s in model.stats()["layers"].values())


def test_extra_round_trips(tmp_path):
    model, opt = _build()
    _train(model, opt, 0, 2)
    extra = {"epoch": 3, "lr": 1.5e-4, "name": "run-α", "history": [1, 2.5, None, True],
             "nested": {"a": {"b": []}}}
    path = tmp_path / "x.sparsecore"
    sc.save(model, path, optimizer=opt, extra=extra)
    other, oopt = _build()
    assert sc.load(path, other, optimizer=oopt) == extra
    sc.save(model, path)                               # model only, no extra
    other2, _ = _build()
    assert sc.load(path, other2) is None
    _assert_models_equal(_model_state(model), _model_state(other2))


def test_unserialisable_extra_refused_before_writing(trained):
    model, opt, path = trained
    before = path.read_bytes()
    with pytest.raises(sc.CheckpointError, match="extra"):
        sc.save(model, path, optimizer=opt, extra={"bad": object()})
    assert path.read_bytes() == before
    assert [f for f in os.listdir(path.parent) if f != path.name] == []   # no temp file left


def test_model_only_checkpoint_and_missing_optimizer_state(tmp_path):
    model, opt = _build()
    _train(model, opt, 0, 4)
    path = tmp_path / "m.sparsecore"
    sc.save(model, path)
    fresh, fopt = _build()
    _train(fresh, fopt, 0, 1)
    snap = _snapshot(fresh, fopt)
    with pytest.raises(sc.CheckpointError, match="no optimizer state"):
        sc.load(path, fresh, optimizer=fopt)
    _assert_unchanged(fresh, fopt, snap)
    sc.load(path, fresh)
    _assert_models_equal(_model_state(model), _model_state(fresh))


# ------------------------------------------------------------------ mismatches

@pytest.mark.parametrize("kw, match", [
    (dict(hidden=41), "41"),
    (dict(sf=0.9), "forward_sparsity|k_a"),
    (dict(sb=0.4), "backward_sparsity|k_b"),
    (dict(exclude=["3"]), "another model"),
    (dict(dtype=torch.float64), "dtype|float"),
])
def test_other_model_refused_and_nothing_changed(trained, kw, match):
    _, _, path = trained
    model, opt = _build(**kw)
    _train(model, opt, 0, 2)            # give the optimizer some state to protect
    snap = _snapshot(model, opt)
    with pytest.raises(sc.CheckpointError, match=match):
        sc.load(path, model, optimizer=opt)
    _assert_unchanged(model, opt, snap)


def test_wrong_optimizer_refused_and_nothing_changed(trained):
    _, _, path = trained
    model, opt = _build(opt="momentum")
    _train(model, opt, 0, 2)
    snap = _snapshot(model, opt)
    with pytest.raises(sc.CheckpointError, match="Adam"):
        sc.load(path, model, optimizer=opt)
    _assert_unchanged(model, opt, snap)


def test_other_param_groups_refused(trained):
    _, _, path = trained
    model, _ = _build(attach=False)
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": params[:3]}, {"params": params[3:], "lr": 1e-3}])
    model.attach(opt)
    _train(model, opt, 0, 1)
    snap = _snapshot(model, opt)
    with pytest.raises(sc.CheckpointError, match="group"):
        sc.load(path, model, optimizer=opt)
    _assert_unchanged(model, opt, snap)


# ------------------------------------------------------------------ corrupt files

def _header(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _fresh_target():
    model, opt = _build()
    _train(model, opt, 0, 1)
    return model, opt, _snapshot(model, opt)


def _expect_refused(path, match=None):
    model, opt, snap = _fresh_target()
    with pytest.raises(sc.CheckpointError, match=match):
        sc.load(path, model, optimizer=opt)
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("keep", ["empty", 7, 8, 100, "half", "minus1"])
def test_truncated_file(trained, keep):
    _, _, path = trained
    raw = path.read_bytes()
    n = {"empty": 0, "half": len(raw) // 2, "minus1": len(raw) - 1}.get(keep, keep)
    path.write_bytes(raw[:n])
    _expect_refused(path)


def test_random_bytes_and_foreign_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "random.bin"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    _expect_refused(p)
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}        ")   # JSON, not safetensors
    _expect_refused(p)
    # a valid safetensors file that is not a sparsecore checkpoint
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(p))
    _expect_refused(p, match="header")
    # a torch.save (pickle) file
    torch.save({"w": torch.zeros(3)}, str(p))
    _expect_refused(p)
    with pytest.raises(FileNotFoundError):
        sc.load(tmp_path / "missing.sparsecore", *_build())


def test_header_byte_flips(trained):
    _, _, path = trained
    raw = path.read_bytes()
    n, _ = _header(raw)
    for pos in (0, 3, 9, 8 + n // 3, 8 + n // 2, 8 + n - 2):
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        _expect_refused(path)


def _tensor_names(path):
    _, hdr = _header(path.read_bytes())
    return sorted(k for k in hdr if k != "__metadata__")


# one byte inside the data of each kind of tensor
DATA_FLIPS = ["model/module.0.values", "model/module.3.values", "model/module.0.reserve_val",
              "model/module.0.bias", "model/module.1.running_var", "model/module.0.a_cols",
              "optim/0/exp_avg", "optim/0/exp_avg_sq"]


@pytest.mark.parametrize("name", DATA_FLIPS)
def test_data_byte_flip_detected(trained, name):
    """A single flipped bit pattern in a tensor's data is corruption too: the
    checkpoint must be refused, not loaded with silently different numbers."""
    _, _, path = trained
    raw = path.read_bytes()
    n, hdr = _header(raw)
    assert name in hdr, _tensor_names(path)
    start, stop = hdr[name]["data_offsets"]
    pos = 8 + n + start + min(1, stop - start - 1)   # second byte: a low-order byte
    bad = bytearray(raw)
    bad[pos] ^= 0x01
    path.write_bytes(bytes(bad))
    _expect_refused(path)


# ------------------------------------------------------------------ no pickle

def test_file_is_plain_safetensors(trained):
    model, _, path = trained
    raw = path.read_bytes()
    n, hdr = _header(raw)
    meta = hdr.pop("__metadata__")
    header = json.loads(meta["sparsecore"])            # the JSON header parses
    assert header["optimizer"]["class"] == "Adam" and header["extra"] == {"step": 5}
    assert "step_count" not in header                   # only in the model's own extra state
    assert header["configs"]["_extra_state"]["step_count"] == 5
    numeric = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
    end = 0
    for name, t in hdr.items():
        assert t["dtype"] in numeric, name
        end = max(end, t["data_offsets"][1])
    assert len(raw) == 8 + n + end                     # nothing after the tensor data
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]
    names = set(hdr)
    for k, v in model.state_dict().items():
        if torch.is_tensor(v):
            assert "model/" + k in names, k


def test_load_executes_no_pickle(trained, monkeypatch):
    _, _, path = trained

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, opt = _build()
    assert sc.load(path, model, optimizer=opt) == {"step": 5}


# ------------------------------------------------------------------ format, step count

def _rewrite(path, edit_header=None, edit_tensors=None, fix_digests=True):
    """Re-write a checkpoint with its JSON header and/or tensors edited (digests
    recomputed unless ``fix_digests`` is False): a well-formed but wrong file."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from sparsecore.checkpoint import _digest
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["sparsecore"])
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if fix_digests:
        header["digests"] = {k: _digest(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"sparsecore": json.dumps(header)})


def test_format_1_refused_naming_the_version(trained):
    _, _, path = trained
    _rewrite(path, edit_header=lambda h: h.update(format_version=1))
    _expect_refused(path, match="format version 1")


def test_valid_digests_but_bad_structure_in_last_layer(trained):
    """A file whose checksums are right but whose last sparse layer has an invalid
    CSR (a column out of range) is refused by the streaming validation after the
    earlier layers were read: nothing may be applied."""
    _, _, path = trained

    def bad(t):
        t["model/module.5.a_cols"][0] = 10_000
    _rewrite(path, edit_tensors=bad)
    _expect_refused(path, match="module.5")


def test_bad_optimizer_tensor_shape_refused_after_model_validated(trained):
    _, _, path = trained

    def bad(t):
        t["optim/3/exp_avg"] = torch.zeros(7)
    _rewrite(path, edit_tensors=bad)
    _expect_refused(path, match="exp_avg")


def test_step_count_belongs_to_the_first_attached_optimizer(tmp_path):
    """Two attached optimizers: a checkpoint saved with the second restores its
    state but not the first optimizer's step count; with the first it does."""
    def build():
        model, _ = _build(attach=False)
        params = list(model.parameters())
        o1 = torch.optim.Adam(params[:2], lr=0.02)
        o2 = torch.optim.Adam(params[2:], lr=0.02)
        model.attach(o1).attach(o2)
        return model, o1, o2

    def train(model, opts, n):
        for step in range(n):
            x, t = _batch(step)
            loss = nn.functional.mse_loss(model(x), t)
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()

    model, o1, o2 = build()
    train(model, (o1, o2), 4)
    p2 = tmp_path / "o2.sparsecore"
    p1 = tmp_path / "o1.sparsecore"
    sc.save(model, p2, optimizer=o2)
    sc.save(model, p1, optimizer=o1)
    other, q1, q2 = build()
    train(other, (q1, q2), 1)
    sc.load(p2, other, optimizer=q2)
    assert other.step_count == 1
    _assert_opts_equal(_opt_state(o2), _opt_state(q2))
    sc.load(p1, other, optimizer=q1)
    assert other.step_count == 4


# ------------------------------------------------------------------ streaming load peak

_PEAK_SCRIPT = r"""
import gc, json, sys
import torch
from torch import nn
import sparsecore as sc

def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) << 10 for l in f
                if l.startswith(("VmRSS", "VmHWM"))}

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()["VmRSS"]

def peak_over(fn):
    r0 = reset()
    fn()
    return status()["VmHWM"] - r0

L = 4
def build(n):
    with torch.device("meta"):
        net = nn.Sequential(*[nn.Linear(n, n) for _ in range(L)])
    m = sc.SparseModel(net, forward_sparsity=0.8, backward_sparsity=0.5, verbose=False)
    o = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m.attach(o)
    return m, o

def step(m, o):
    x = torch.randn(4, m.module[0].in_features)
    m(x).square().mean().backward()
    o.step()
    o.zero_grad(set_to_none=False)

# warm-up on the measured shape itself, so every kernel that the measured phases run is
# compiled or loaded from Numba's cache before the baseline: a smaller model missed the
# dense-tile sddmm (>= 2^26 dense flops) and the tie path of the top-K select (ties
# among 9 M keys happen by chance), and a first compile in a measured phase, as on a
# fresh clone, costs ~65 MiB of RSS
N = 3000
m, o = build(N); step(m, o); sc.save(m, sys.argv[1], optimizer=o); sc.load(sys.argv[1], m, o)
del m, o; gc.collect()
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = reset()
m, o = build(N); step(m, o)
steady = sum(m.memory_report(o)[k] for k in ("values", "gradients", "optimizer_state",
                                             "indices", "reserve", "dense_parameters",
                                             "dense_gradients"))
# the memory held, not what the allocator keeps cached from the build's temporaries
# (freed chunks in the worker threads' arenas: up to ~150 MiB more, run to run)
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
out = {"steady": steady, "rss_model": status()["VmRSS"] - base}
path = sys.argv[1]
out["save"] = peak_over(lambda: sc.save(m, path, optimizer=o))
out["load_in_place"] = peak_over(lambda: sc.load(path, m, optimizer=o))
del m, o; gc.collect()
reset()
m, o = build(N)                  # a fresh run resuming: no optimizer state yet
sc.load(path, m, optimizer=o)
out["fresh_build_and_load"] = status()["VmHWM"] - base
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc/self/clear_refs to reset the RSS peak")
def test_save_and_load_stream(tmp_path):
    """Save and load peak (VmHWM, reset per phase) within 1.25x of the model's
    steady state plus one chunk: load reads one tensor (one layer) at a time, so
    four equal layers cost one layer's tensors, not a second model."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "c.sparsecore")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    chunk = 64 << 20
    steady = r["steady"]
    assert r["rss_model"] < 1.15 * steady + chunk, r           # the analytic model is right
    assert r["save"] < 0.05 * steady + chunk, r                 # save copies nothing
    assert r["load_in_place"] < 0.25 * steady + chunk, r        # one layer, not a model
    assert r["fresh_build_and_load"] < 1.25 * steady + chunk, r


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_is_bit_identical(tmp_path):
    """A model and optimizer living on the GPU save (tensors are copied to the host
    one at a time) and resume exactly; loading puts everything back on the GPU."""
    def build():
        torch.manual_seed(0)
        model = sc.SparseModel(_net(), forward_sparsity=0.8, backward_sparsity=0.5,
                               refresh_every=REFRESH_EVERY, exploration=0.3, seed=1).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        model.attach(opt)
        return model, opt

    def train(model, opt, start, stop):
        for step in range(start, stop):
            x, t = (v.cuda() for v in _batch(step))
            loss = nn.functional.mse_loss(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()

    ref, ref_opt = build()
    train(ref, ref_opt, 0, 8)
    model, opt = build()
    train(model, opt, 0, 4)
    sc.save(model, tmp_path / "c.sparsecore", optimizer=opt)
    resumed, ropt = build()
    sc.load(tmp_path / "c.sparsecore", resumed, optimizer=ropt)
    on_host = [k for k, t in resumed.state_dict().items()
               if torch.is_tensor(t) and t.device.type != "cuda"]
    # Scalars, and the cold store, which lives on disk (memory-mapped) on every device.
    assert on_host and all(k.endswith((".floor", ".key", ".cold_idx", ".cold_val"))
                           for k in on_host), on_host
    assert any(k.endswith(".values") for k, t in resumed.state_dict().items()
               if torch.is_tensor(t) and t.device.type == "cuda")
    train(resumed, ropt, 4, 8)
    _assert_models_equal(_model_state(ref), _model_state(resumed))
    _assert_opts_equal(_opt_state(ref_opt), _opt_state(ropt))


def test_cold_store_round_trips_and_resumes_exactly(tmp_path):
    """A model whose layers spilled trained coordinates to disk saves them (read
    from the memory-mapped store) and a fresh model resumes bit-identically, with
    the loaded cold entries written to its own spill directory."""
    kw = dict(reserve=0.0, exploration=0.0)
    ref_model, ref_opt = _build(opt="adamw-amsgrad", **kw)
    _train(ref_model, ref_opt, 0, 14)
    model, opt = _build(opt="adamw-amsgrad", **kw)
    _train(model, opt, 0, 9)
    spilled = {n: l.sparse_state.cold.n for n, l in model.sparse_layers().items()}
    assert sum(spilled.values()) > 0, "the test needs spilled entries"
    sc.save(model, tmp_path / "c.sparsecore", optimizer=opt)
    resumed, ropt = _build(opt="adamw-amsgrad", **kw)
    for l in resumed.sparse_layers().values():
        l.spill_dir = str(tmp_path / "spill")
    sc.load(tmp_path / "c.sparsecore", resumed, optimizer=ropt)
    for n, l in resumed.sparse_layers().items():
        assert l.sparse_state.cold.n == spilled[n]
        if spilled[n]:
            assert l.sparse_state.cold.prefix.startswith(str(tmp_path / "spill"))
    _train(resumed, ropt, 9, 14)
    _assert_models_equal(_model_state(ref_model), _model_state(resumed))
    _assert_opts_equal(_opt_state(ref_opt), _opt_state(ropt))


@pytest.mark.parametrize("which", ["cold_idx", "cold_val"])
def test_cold_entries_stream_in_chunks_and_corruption_is_refused(tmp_path, monkeypatch, which):
    """Loading streams the cold entries in chunks (never whole) and checks their
    digests; a flipped byte in them is refused and leaves the model unchanged."""
    from sparsecore import spill
    monkeypatch.setattr(spill, "CHUNK", 5)
    kw = dict(reserve=0.0, exploration=0.0)
    model, opt = _build(opt="adamw-amsgrad", **kw)
    _train(model, opt, 0, 9)
    path = tmp_path / "c.sparsecore"
    sc.save(model, path, optimizer=opt)
    name = next(f"model/module.{n}.{which}" for n, l in model.sparse_layers().items()
                if l.sparse_state.cold.n > 10)
    fresh, fopt = _build(opt="adamw-amsgrad", **kw)
    sc.load(path, fresh, optimizer=fopt)                      # several chunks per layer
    _assert_models_equal(_model_state(model), _model_state(fresh))
    raw = path.read_bytes()
    n, hdr = _header(raw)
    start, stop = hdr[name]["data_offsets"]
    bad = bytearray(raw)
    bad[8 + n + stop - 1] ^= 0x01                             # in the last chunk
    path.write_bytes(bytes(bad))
    target, topt = _build(opt="adamw-amsgrad", **kw)
    snap = _snapshot(target, topt)
    with pytest.raises(sc.CheckpointError, match="corrupt|cold"):
        sc.load(path, target, optimizer=topt)
    _assert_unchanged(target, topt, snap)
    assert all(l.sparse_state.cold.n == 0 for l in target.sparse_layers().values())
