"""SparseModel on Hugging Face transformers models built under torch.device("meta"):
LlamaForCausalLM, GPT2LMHeadModel (Conv1D projections) and
BertForSequenceClassification are wrapped, trained with AdamW, saved, reloaded into
a fresh meta-built model and continued bit-identically; the dense part gets the
model's own initialisation (rotary inv_freq, BERT position ids, norms, embeddings);
ties are kept unless untie= is given; Conv1D matches the dense Conv1D."""
from __future__ import annotations

import os
import runpy

import pytest
import torch
from torch import nn

import sparsecore as sc
from test_research_models import _assert_same, _state, _wrap, resume_is_exact

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D  # noqa: E402

V = 96
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def llama_config(**kw):
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def gpt2_config():
    return GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                      eos_token_id=2)


def bert_config():
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, num_labels=3,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


def _lm_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (2, 9), generator=g) for _ in range(n)]


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


CASES = {
    "llama": (LlamaForCausalLM, llama_config, _lm_loss, _lm_batches),
    "llama-tied": (LlamaForCausalLM, lambda: llama_config(tie_word_embeddings=True), _lm_loss,
                   _lm_batches),
    "gpt2": (GPT2LMHeadModel, gpt2_config, _lm_loss, _lm_batches),
    "bert": (BertForSequenceClassification, bert_config,
             lambda m, b: m(input_ids=b[0], labels=b[1]).loss,
             lambda n: [(ids, ids[:, 0] % 3) for ids in _lm_batches(n)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_build_train_save_resume_exact(case, tmp_path):
    cls, config, loss_fn, batches = CASES[case]

    def build():
        model = _wrap(_meta(cls, config()))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.attach(opt)
        return model, opt

    model = resume_is_exact(build, loss_fn, batches(5), stop=3, tmp_path=tmp_path)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    n_sparse = len(model.sparse_layers())
    assert n_sparse == {"llama": 15, "llama-tied": 14, "gpt2": 8, "bert": 14}[case]


def test_dense_part_gets_the_models_own_initialisation():
    cpu = LlamaForCausalLM(llama_config())     # the oracle for derived buffers
    model = _wrap(_meta(LlamaForCausalLM, llama_config()))
    llama = model.module
    rot = llama.model.rotary_emb
    assert torch.equal(rot.inv_freq, cpu.model.rotary_emb.inv_freq)
    assert torch.equal(rot.original_inv_freq, cpu.model.rotary_emb.original_inv_freq)
    assert torch.equal(llama.model.norm.weight, torch.ones(32))
    std = llama.config.initializer_range     # PreTrainedModel._init_weights: N(0, 0.02)
    assert 0.7 * std < llama.model.embed_tokens.weight.std().item() < 1.3 * std
    assert torch.equal(llama.model.embed_tokens.weight[0], torch.zeros(32))  # padding_idx

    bert = _wrap(_meta(BertForSequenceClassification, bert_config())).module
    emb = bert.bert.embeddings
    assert torch.equal(emb.position_ids, torch.arange(32).expand(1, -1))
    assert torch.equal(emb.token_type_ids, torch.zeros(1, 32, dtype=torch.long))
    assert torch.equal(emb.LayerNorm.weight, torch.ones(32))


def test_meta_builds_are_deterministic_per_seed():
    a = _wrap(_meta(GPT2LMHeadModel, gpt2_config()), seed=5)
    b = _wrap(_meta(GPT2LMHeadModel, gpt2_config()), seed=5)
    c = _wrap(_meta(GPT2LMHeadModel, gpt2_config()), seed=6)
    _assert_same(_state(a), _state(b))
    assert not torch.equal(a.module.transformer.wpe.weight, c.module.transformer.wpe.weight)


@pytest.mark.parametrize("cls, config, head, embed", [
    (GPT2LMHeadModel, gpt2_config, "lm_head", "transformer.wte"),
    (LlamaForCausalLM, lambda: llama_config(tie_word_embeddings=True), "lm_head",
     "model.embed_tokens"),
])
def test_tied_lm_head_kept_or_untied(cls, config, head, embed):
    with pytest.warns(UserWarning, match=rf"{head} stays dense because its weight is tied.*"
                                         rf"{embed}\.weight.*untie=\['{head}'\]"):
        model = sc.SparseModel(_meta(cls, config()), forward_sparsity=0.5,
                               backward_sparsity=0.3, verbose=False)
    net = model.module
    assert net.get_submodule(head).weight is net.get_submodule(embed).weight
    assert not net.get_submodule(head).weight.is_meta
    assert head not in model.sparse_layers()

    model = _wrap(_meta(cls, config()), untie=[head])
    net = model.module
    assert isinstance(net.get_submodule(head), sc.TopKASTLinear)
    assert not net.get_submodule(embed).weight.is_meta
    assert head + ".weight" not in net.all_tied_weights_keys
    net.tie_weights()                           # HF's re-tying leaves the sparse head alone
    assert isinstance(net.get_submodule(head), sc.TopKASTLinear)
    assert "weight" not in net.get_submodule(head)._parameters
    assert torch.isfinite(_lm_loss(model, _lm_batches(1)[0]))


def test_gpt2_conv1d_matches_dense_conv1d():
    """A Conv1D (weight stored (in, out)) becomes a TopKASTLinear whose dense weight is
    the transpose; at sparsity 0 it computes what the dense Conv1D with that weight
    computes. Real biases are kept."""
    torch.manual_seed(0)
    holder = nn.Sequential(Conv1D(12, 8), nn.GELU(), Conv1D(8, 12))
    with torch.no_grad():
        holder[0].bias.normal_()
    bias = holder[0].bias.clone()
    model = _wrap(holder, forward_sparsity=0.0, backward_sparsity=0.0)
    layer = holder[0]
    assert isinstance(layer, sc.TopKASTLinear)
    assert (layer.in_features, layer.out_features) == (8, 12)
    assert torch.equal(layer.bias, bias)
    dense = Conv1D(12, 8)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense("forward").t())
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)
    assert "Conv1D(8->12)" in model.summary()


def test_llama_generate_equals_greedy_loop():
    model = _wrap(_meta(LlamaForCausalLM, llama_config()))
    model.eval()
    prompt = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        out = model.module.generate(prompt, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)
        ids = prompt
        for _ in range(5):      # oracle: recompute the full sequence each step
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_bf16_model_gets_float32_sparse_layers_and_says_so():
    with torch.device("meta"):
        net = LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    model = _wrap(net)
    assert all(l.values.dtype == torch.float32 for l in model.sparse_layers().values())
    assert net.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "built in float32 (the model's torch.bfloat16 is not supported" in model.summary()


def test_example_hf_llama_meta(capsys):
    runpy.run_path(os.path.join(EXAMPLES, "hf_llama_meta.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "resumed losses equal: True" in out
    assert "generated:" in out
