"""SparseModel on research-style code: a nanoGPT-style GPT (tests/nanogpt.py) and
nn.TransformerEncoder built on the meta device, trained, checkpointed and resumed
bit-identically; nn.MultiheadAttention / nn.Conv1d replacements checked against the
original dense modules at sparsity 0; ties, summary, meta initialisation, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from nanogpt import GPT, GPTConfig

SPARSE = dict(forward_sparsity=0.6, backward_sparsity=0.4)
DENSE_EQUIV = dict(forward_sparsity=0.0, backward_sparsity=0.0)  # every weight in A


def _wrap(net, **kw):
    cfg = dict(SPARSE, seed=3, refresh_every=2, verbose=False)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.SparseModel(net, **cfg)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def resume_is_exact(build, loss_fn, batches, stop, tmp_path):
    """Train on ``batches`` uninterrupted, and again stopping after ``stop`` steps, saving,
    loading into a freshly built model + optimizer and continuing: the losses and the
    final states must be identical. ``build()`` returns (model, optimizer), attached."""
    def step(model, opt, batch):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model_a, opt_a = build()
    straight = [step(model_a, opt_a, b) for b in batches]
    model_b, opt_b = build()
    first = [step(model_b, opt_b, b) for b in batches[:stop]]
    path = tmp_path / "ckpt.sparsecore"
    sc.save(model_b, path, optimizer=opt_b)
    model_c, opt_c = build()
    sc.load(path, model_c, optimizer=opt_c)
    assert model_c.step_count == stop
    rest = [step(model_c, opt_c, b) for b in batches[stop:]]
    assert first + rest == straight
    assert model_a.step_count == model_c.step_count == len(batches)
    assert model_a.stats()["total"]["changed_a"] == model_c.stats()["total"]["changed_a"]
    _assert_same(_state(model_a), _state(model_c))
    assert len(set(straight)) > 1  # it did train
    return model_a


# ------------------------------------------------------------------ nanoGPT

def _meta_gpt(**cfg):
    with torch.device("meta"):
        return GPT(GPTConfig(**cfg))


def _gpt_batches(n, seed=0, cfg=GPTConfig()):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=g)
            for _ in range(n)]


def _gpt_loss(model, batch):
    return model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())[1]


def test_nanogpt_meta_build_train_save_resume(tmp_path):
    def build():
        model = _wrap(_meta_gpt())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, model.attach(opt) and opt

    model = resume_is_exact(build, _gpt_loss, _gpt_batches(6), stop=3, tmp_path=tmp_path)
    gpt = model.module
    # every projection is sparse; the tied lm_head stays dense and tied
    assert set(model.sparse_layers()) == {f"transformer.h.{i}.{p}" for i in range(2)
                                          for p in ("attn.c_attn", "attn.c_proj",
                                                    "mlp.c_fc", "mlp.c_proj")}
    assert type(gpt.lm_head) is nn.Linear
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


def test_nanogpt_meta_init_uses_the_models_own_init():
    model = _wrap(_meta_gpt())
    gpt = model.module
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    # the embeddings come from GPT._init_weights (N(0, 0.02)), not nn.Embedding's N(0, 1)
    for emb in (gpt.transformer.wte, gpt.transformer.wpe):
        assert 0.015 < emb.weight.std().item() < 0.025
    # the custom LayerNorm (no reset_parameters, ignored by _init_weights) is the identity
    for ln in (gpt.transformer.ln_f, gpt.transformer.h[0].ln_1, gpt.transformer.h[1].ln_2):
        assert torch.equal(ln.weight, torch.ones(32)) and torch.equal(ln.bias, torch.zeros(32))


def test_nanogpt_two_meta_builds_same_seed_identical():
    a, b, c = _wrap(_meta_gpt()), _wrap(_meta_gpt()), _wrap(_meta_gpt(), seed=4)
    _assert_same(_state(a), _state(b))
    sa, sc_ = _state(a), _state(c)
    assert not torch.equal(sa["module.transformer.wte.weight"], sc_["module.transformer.wte.weight"])
    assert not torch.equal(sa["module.transformer.h.0.attn.c_attn.values"],
                           sc_["module.transformer.h.0.attn.c_attn.values"])


def test_nanogpt_tied_head_warns_and_untie_opts_in():
    with pytest.warns(UserWarning, match=r"lm_head stays dense.*tied.*transformer\.wte\.weight"
                                         r".*untie=\['lm_head'\]"):
        model = sc.SparseModel(_meta_gpt(), **SPARSE, verbose=False)
    assert "lm_head" not in model.sparse_layers()
    dense = model.summary().split("dense:")[1]
    assert "lm_head" in dense and "tied" in dense
    # it trains with the tie intact: one tensor, updated once per step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.attach(opt)
    before = model.module.lm_head.weight.detach().clone()
    loss = _gpt_loss(model, _gpt_batches(1)[0])
    loss.backward()
    opt.step()
    assert model.module.lm_head.weight is model.module.transformer.wte.weight
    assert not torch.equal(before, model.module.lm_head.weight)

    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no tie warning when the user opted in
        model = sc.SparseModel(_meta_gpt(), **SPARSE, untie=["lm_head"], verbose=False)
    gpt = model.module
    assert isinstance(gpt.lm_head, sc.TopKASTLinear)
    assert (gpt.lm_head.in_features, gpt.lm_head.out_features) == (32, 96)
    assert type(gpt.transformer.wte) is nn.Embedding and not gpt.transformer.wte.weight.is_meta
    assert "tie broken" in model.summary()
    assert torch.isfinite(_gpt_loss(model, _gpt_batches(1)[0]))


def test_untie_pattern_must_name_a_tied_module():
    with pytest.raises(ValueError, match=r"untie pattern 'transformer\.h\.0\.mlp\.c_fc' matches "
                                         r"no tied module.*\['lm_head'\]"):
        _wrap(_meta_gpt(), untie=["transformer.h.0.mlp.c_fc"])


# ------------------------------------------------------------------ nn.TransformerEncoder

class EncoderClassifier(nn.Module):
    def __init__(self, vocab=64, d=32, heads=4, layers=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids, pad=None):
        h = self.encoder(self.emb(ids), src_key_padding_mask=pad)
        return self.head(h[:, 0])


def _encoder_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (3, 7), generator=g), torch.randint(0, 3, (3,), generator=g))
            for _ in range(n)]


def test_transformer_encoder_meta_build_train_save_resume(tmp_path):
    def build():
        with torch.device("meta"):
            net = EncoderClassifier()
        model = _wrap(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, model.attach(opt) and opt

    model = resume_is_exact(build, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                            _encoder_batches(5), stop=3, tmp_path=tmp_path)
    names = set(model.sparse_layers())
    for i in range(2):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "linear1", "linear2"):
            assert f"encoder.layers.{i}.{p}" in names
        assert isinstance(model.module.encoder.layers[i].self_attn, sc.TopKASTMultiheadAttention)
    assert "head" in names


def _dense_copy_of_encoder(sparse_net: EncoderClassifier) -> EncoderClassifier:
    """The dense module with the sparse model's forward weights (the oracle)."""
    dense = EncoderClassifier()
    with torch.no_grad():
        dense.emb.weight.copy_(sparse_net.emb.weight)
        for ld, ls in zip(dense.encoder.layers, sparse_net.encoder.layers):
            a = ls.self_attn
            ld.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.to_dense("forward"),
                                                         a.k_proj.to_dense("forward"),
                                                         a.v_proj.to_dense("forward")]))
            ld.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias,
                                                       a.v_proj.bias]))
            ld.self_attn.out_proj.weight.copy_(a.out_proj.to_dense("forward"))
            ld.self_attn.out_proj.bias.copy_(a.out_proj.bias)
            for n in ("linear1", "linear2"):
                getattr(ld, n).weight.copy_(getattr(ls, n).to_dense("forward"))
                getattr(ld, n).bias.copy_(getattr(ls, n).bias)
            for n in ("norm1", "norm2"):
                getattr(ld, n).load_state_dict(getattr(ls, n).state_dict())
        dense.head.weight.copy_(sparse_net.head.to_dense("forward"))
        dense.head.bias.copy_(sparse_net.head.bias)
    return dense


def test_transformer_encoder_matches_dense_incl_eval_fast_path():
    """At sparsity 0 the sparse encoder equals the dense one with the same weights, in
    training mode and in eval mode with a padding mask (where the dense module takes
    torch's fused fast path and the sparse one the regular path)."""
    with torch.device("meta"):
        net = EncoderClassifier()
    model = _wrap(net, **DENSE_EQUIV)
    dense = _dense_copy_of_encoder(net)
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 6:] = True
    torch.testing.assert_close(model(ids, pad), dense(ids, pad), atol=1e-5, rtol=1e-4)
    model.eval()
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pad), dense(ids, pad), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(ids), dense(ids), atol=1e-5, rtol=1e-4)
    assert net.encoder.use_nested_tensor is False  # the fused path is off for the sparse one


# ------------------------------------------------------------------ MultiheadAttention

class AttnHolder(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(**kw)

    def forward(self, *a, **k):
        return self.attn(*a, **k)


def _dense_mha_like(sparse: sc.TopKASTMultiheadAttention, **kw) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(**kw)
    q, k, v = (p.to_dense("forward") for p in (sparse.q_proj, sparse.k_proj, sparse.v_proj))
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([q, k, v]))
        else:
            mha.q_proj_weight.copy_(q)
            mha.k_proj_weight.copy_(k)
            mha.v_proj_weight.copy_(v)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(torch.cat([sparse.q_proj.bias, sparse.k_proj.bias,
                                              sparse.v_proj.bias]))
            mha.out_proj.bias.copy_(sparse.out_proj.bias)
        mha.out_proj.weight.copy_(sparse.out_proj.to_dense("forward"))
        if mha.bias_k is not None:
            mha.bias_k.copy_(sparse.bias_k)
            mha.bias_v.copy_(sparse.bias_v)
    return mha


MHA_CONFIGS = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=16, num_heads=4, batch_first=True),
    dict(embed_dim=16, num_heads=2, kdim=12, vdim=10, batch_first=True),
    dict(embed_dim=16, num_heads=4, add_bias_kv=True, add_zero_attn=True),
    dict(embed_dim=16, num_heads=4, bias=False, batch_first=True),
]


@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()
                                                                    if k not in ("embed_dim",)))
def test_mha_matches_original_module(cfg):
    with torch.device("meta"):
        holder = AttnHolder(**cfg)
    _wrap(holder, **DENSE_EQUIV)
    sparse = holder.attn
    assert isinstance(sparse, sc.TopKASTMultiheadAttention)
    dense = _dense_mha_like(sparse, **cfg)
    g = torch.Generator().manual_seed(0)
    n, L, S, E = 3, 5, 6, 16
    kd, vd = cfg.get("kdim", E), cfg.get("vdim", E)
    bf = cfg.get("batch_first", False)

    def inp(length, dim):
        t = torch.randn(n, length, dim, generator=g)
        return t if bf else t.transpose(0, 1)

    q, k, v = inp(L, E), inp(S, kd), inp(S, vd)
    kpm = torch.zeros(n, S, dtype=torch.bool)
    kpm[0, -2:] = True
    h = cfg["num_heads"]
    masks = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(L, S, generator=g)),
             dict(attn_mask=torch.rand(L, S, generator=g) > 0.7, key_padding_mask=kpm),
             dict(attn_mask=torch.randn(n * h, L, S, generator=g)),
             dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L)[:, :S] if S == L
                  else torch.triu(torch.full((L, S), float("-inf")), 1), is_causal=True)]
    for mode in ("train", "eval"):
        dense.train(mode == "train")
        sparse.train(mode == "train")
        for m in masks:
            for need_weights in (True, False):
                for avg in (True, False):
                    kw = dict(m, need_weights=need_weights, average_attn_weights=avg)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # torch: mixed mask types deprecated
                        want, want_w = dense(q, k, v, **kw)
                    got, got_w = sparse(q, k, v, **kw)
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
                    assert (got_w is None) == (want_w is None)
                    if want_w is not None:
                        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-4)
    # unbatched input
    qu, ku, vu = (t[0] if bf else t[:, 0] for t in (q, k, v))
    want, want_w = dense(qu, ku, vu)
    got, got_w = sparse(qu, ku, vu)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-4)


def test_mha_gradients_reach_all_projections_and_biases_are_kept():
    torch.manual_seed(0)
    holder = AttnHolder(embed_dim=16, num_heads=4, add_bias_kv=True)
    with torch.no_grad():
        holder.attn.in_proj_bias.normal_()
        holder.attn.out_proj.bias.normal_()
    in_bias, out_bias = holder.attn.in_proj_bias.clone(), holder.attn.out_proj.bias.clone()
    bias_k = holder.attn.bias_k.clone()
    model = _wrap(holder)
    a = holder.attn
    assert torch.equal(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]), in_bias)
    assert torch.equal(a.out_proj.bias, out_bias) and torch.equal(a.bias_k, bias_k)
    x = torch.randn(5, 2, 16)
    model(x, x, x)[0].square().sum().backward()
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(a, p).values.grad.abs().sum() > 0, p
    assert a.bias_k.grad.abs().sum() > 0


# ------------------------------------------------------------------ Conv1d

class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2)
        self.grouped = nn.Conv1d(5, 5, 3, groups=5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.grouped(self.conv(x)).mean(-1))


def test_conv1d_matches_f_conv1d_and_grouped_stays_dense():
    with torch.device("meta"):
        net = Conv1dNet()
    model = _wrap(net, **DENSE_EQUIV)
    conv = net.conv
    assert isinstance(conv, sc.TopKASTConv1d) and type(net.grouped) is nn.Conv1d
    assert "conv.linear" in model.sparse_layers()
    w = conv.linear.to_dense("forward").view(5, 3, 3)
    x = torch.randn(2, 3, 13)
    torch.testing.assert_close(conv(x), F.conv1d(x, w, conv.bias, stride=2, padding=1,
                                                 dilation=2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(conv(x[0]), F.conv1d(x[0], w, conv.bias, stride=2, padding=1,
                                                    dilation=2), atol=1e-6, rtol=1e-5)
    dense_part = model.summary().split("dense:")[1]
    assert "grouped" in dense_part and "groups=5 is not supported" in dense_part
    with pytest.raises(ValueError, match=r"expected \(N, C=3, L\)"):
        conv(torch.randn(2, 4, 13))


# ------------------------------------------------------------------ coverage and summary

class Mixed(nn.Module):
    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(8, 8)
        self.subclass = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)
        self.custom = Mixed.OwnForward(8, 8)
        self.conv3d = nn.Conv3d(2, 2, 1)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])


def test_summary_lists_sparse_and_dense_with_reasons(capsys):
    with torch.device("meta"):
        net = Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sc.SparseModel(net, **SPARSE, exclude=["blocks.1"])
    printed = capsys.readouterr().out
    assert printed.strip() == model.summary()       # printed at construction
    assert set(model.sparse_layers()) == {"plain", "subclass", "blocks.0", "blocks.2"}
    s = model.summary()
    sparse_part, dense_part = s.split("dense:")
    assert s.startswith("SparseModel (seed=0): 4 module(s) sparse, 3 linear-like module(s) dense")
    for n in ("plain", "subclass", "blocks.*"):
        assert n in sparse_part
    assert "blocks.* (x2)" in sparse_part and "S_f=0.6, S_b=0.4" in sparse_part
    assert "custom  OwnForward(8->8)  unsupported: OwnForward overrides Linear.forward" in dense_part
    assert "conv3d" in dense_part and "Conv3d has no sparse counterpart" in dense_part
    assert "blocks.1  Linear(8->8)  excluded by pattern 'blocks.1'" in dense_part
    full = model.summary(expand=True)
    assert "blocks.0  Linear(8->8)" in full and "blocks.2  Linear(8->8)" in full


def test_include_naming_only_unsupported_modules_is_an_error():
    with torch.device("meta"):
        net = Mixed()
    with pytest.raises(ValueError, match=r"include pattern 'custom' names only modules that "
                                         r"cannot be made sparse: custom \(OwnForward: "
                                         r"OwnForward overrides Linear.forward\)"):
        _wrap(net, include=["custom"])
    assert all(t.is_meta for t in net.parameters())   # nothing was applied


def test_discarded_dense_weights_are_warned_once():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"discarded the dense weights of 4 replaced module"
                                         r"\(s\) \(plain, subclass, blocks.0, blocks.2\)") as rec:
        sc.SparseModel(Mixed(), **SPARSE, exclude=["blocks.1"], verbose=False)
    assert sum("discarded" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a meta build discards nothing: no warning
        with torch.device("meta"):
            net = Mixed()
        sc.SparseModel(net, **SPARSE, verbose=False)


# ------------------------------------------------------------------ meta initialisation

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x) * self.scale)


def test_uninitialisable_tensor_error_names_module_and_remedy():
    with torch.device("meta"):
        net = Scaled()
    with pytest.raises(ValueError, match=r"module <root> \(Scaled\).*\['scale'\].*init_fn"):
        _wrap(net)
    assert type(net.fc) is nn.Linear and net.fc.weight.is_meta and net.norm.weight.is_meta


def test_init_fn_initialises_and_takes_precedence():
    def init_fn(m):
        if isinstance(m, Scaled):
            nn.init.constant_(m.scale, 0.5)
        if isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.weight, 2.0)   # bias left to reset_parameters()

    with torch.device("meta"):
        net = Scaled()
    model = _wrap(net, init_fn=init_fn)
    assert torch.equal(net.scale, torch.full((8,), 0.5))
    assert torch.equal(net.norm.weight, torch.full((8,), 2.0))
    assert torch.equal(net.norm.bias, torch.zeros(8))
    assert torch.isfinite(model(torch.randn(2, 8))).all()


def test_init_fn_that_initialises_nothing_or_leaves_meta_tensors():
    with torch.device("meta"):
        net = Scaled()
    with pytest.raises(ValueError, match=r"Scaled.*\['scale'\].*tried: init_fn"):
        _wrap(net, init_fn=lambda m: None)

    def to_meta(m):
        if isinstance(m, Scaled):
            m.scale = nn.Parameter(torch.empty(8, device="meta"))

    with pytest.raises(ValueError, match=r"left on the meta device after init_fn: \['scale'\]"):
        _wrap(net, init_fn=to_meta)
    assert net.scale.is_meta and type(net.fc) is nn.Linear  # restored, nothing applied


def test_buffer_only_module_rebuilt_from_config():
    class Cfg:
        n = 6

    class Table(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.register_buffer("freq", torch.arange(config.n) / 10.0, persistent=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = Table(Cfg())
            self.fc = nn.Linear(6, 6)

    with torch.device("meta"):
        net = Net()
    _wrap(net)
    assert torch.equal(net.table.freq, torch.arange(6) / 10.0)


# ------------------------------------------------------------------ extra state

def test_step_count_and_stats_travel_in_state_dict():
    def build():
        with torch.device("meta"):
            net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        model = _wrap(net)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.attach(opt)
        return model, opt

    model, opt = build()
    for _ in range(5):
        loss = model(torch.randn(4, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = model.state_dict()
    assert sd["_extra_state"]["step_count"] == 5
    assert sd["_extra_state"]["stats"]["0"]["refreshes"] == 2
    other, _ = build()
    other.load_state_dict(sd)
    assert other.step_count == 5
    assert other.stats() == model.stats()


def test_inference_export_of_attention_and_conv1d_wrappers():
    from sparsecore import export
    torch.manual_seed(0)
    for net, inp in ((EncoderClassifier(), (torch.randint(0, 64, (2, 5)),)),
                     (Conv1dNet(), (torch.randn(2, 3, 13),))):
        model = _wrap(net)
        model.eval()
        inf = export.inference_model(model)
        assert not any(isinstance(m, sc.TopKASTLinear) for m in inf.modules())
        with torch.no_grad():
            torch.testing.assert_close(inf(*inp), model(*inp), atol=1e-6, rtol=1e-5)


def test_encoder_with_dense_attention_and_sparse_ffn_runs_in_eval():
    """The fused eval path also reads linear1/linear2.weight: it must be off when only
    the feed-forward layers are sparse (the output equals the training-mode one, as
    dropout is 0)."""
    with torch.device("meta"):
        net = EncoderClassifier()
    model = _wrap(net, exclude=["encoder.layers.*.self_attn"])
    assert type(net.encoder.layers[0].self_attn) is nn.MultiheadAttention
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        train_out = model(ids, pad)
        model.eval()
        torch.testing.assert_close(model(ids, pad), train_out, atol=1e-5, rtol=1e-4)


def test_failed_build_leaves_the_module_unchanged():
    with torch.device("meta"):
        net = Scaled()
    with pytest.raises(ValueError, match="layer 'fc': reserve must be"):
        _wrap(net, init_fn=lambda m: nn.init.ones_(m.scale) if isinstance(m, Scaled) else None,
              reserve=-1.0)
    # the dense part had been materialised before the sparse layer failed: undone
    assert net.scale.is_meta and net.norm.weight.is_meta and net.fc.weight.is_meta
    assert type(net.fc) is nn.Linear
