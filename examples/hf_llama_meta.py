"""A Hugging Face Llama built from its config on the meta device, made Top-KAST
sparse, trained a few steps, saved, reloaded into a fresh model and used for
generation.

The dense model is never allocated: the projections are built sparse directly,
and only the small dense part (embeddings, norms, rotary frequencies) is
materialised, with the model's own initialisation. The toy task is counting:
each sequence is ``s, s+1, s+2, ...`` (mod the vocabulary), so after training
greedy generation continues a count.

    python examples/hf_llama_meta.py
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsecore as sc

VOCAB, SEQ = 64, 12


def make_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build(verbose: bool = False):
    """A sparse Llama and its optimizer; the same call rebuilds the same model."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(make_config())       # no memory allocated
    model = sc.SparseModel(llama, forward_sparsity=0.8, backward_sparsity=0.6,
                           refresh_every=10, seed=0, verbose=verbose)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.attach(opt)
    return model, opt


def batch(step: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    start = torch.randint(2, VOCAB, (size, 1), generator=g)
    return (start + torch.arange(SEQ)) % (VOCAB - 2) + 2     # counting, skipping ids 0 and 1


def train(model, opt, steps) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()                      # refreshes A and B every 10th step
        losses.append(loss.item())
    return losses


def main(total: int = 60, stop: int = 40) -> None:
    t0 = time.time()
    model, opt = build(verbose=True)
    first = train(model, opt, range(stop))
    print(f"loss {first[0]:.3f} -> {first[-1]:.3f} after {stop} steps")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "llama.sparsecore")
        sc.save(model, path, optimizer=opt)
        size = os.path.getsize(path)
        resumed, opt2 = build()          # a fresh meta build, then the checkpoint
        sc.load(path, resumed, optimizer=opt2)
    rest = train(resumed, opt2, range(stop, total))
    straight, opt3 = build()             # the same run without interruption
    uninterrupted = train(straight, opt3, range(total))
    print(f"checkpoint {size / 1024:.0f} KiB; resumed losses equal: "
          f"{first + rest == uninterrupted}; final loss {rest[-1]:.3f}")

    resumed.eval()
    prompt = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        out = resumed.module.generate(prompt, max_new_tokens=6, do_sample=False,
                                      pad_token_id=1)
    print(f"generated: {out[0].tolist()}")
    stats = resumed.stats()["total"]
    print(f"forward non-zeros {stats['nnz_a']:,} of {stats['dense_equivalent']:,} weights, "
          f"{stats['step_count']} steps, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
