"""The accounting behind ``benchmarks/targets.py``: which product calls a training
step makes, with which shapes, and the roof each call is given.

The benchmark's verdict (a speed target above the speedup the step would have with
every product at its roof cannot be met by faster kernels) rests on recording
every product call of a step with its true sizes; a call missed or mis-sized would
make the roofs, and the verdict, wrong.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
targets = pytest.importorskip("targets")
roofline = pytest.importorskip("roofline")

import sparsecore as sc  # noqa: E402


def test_a_layer_step_records_its_three_products_with_their_sizes():
    torch.manual_seed(0)
    n, fin, fout = 24, 96, 160
    layer = sc.TopKASTLinear(fin, fout, forward_sparsity=0.9, backward_sparsity=0.8)
    x = torch.randn(n, fin, requires_grad=True)
    rec = targets.CallRecorder()
    try:
        layer(x).square().sum().backward()
        times = rec.take()
    finally:
        rec.restore()
    ka, kb = layer.k_a, layer.k_b
    assert kb == layer.values.numel() and ka < kb
    assert rec.calls == [("spmm", ka, n, fin, fout, 4),      # y = x W_A^T
                         ("spmm_t", ka, n, fout, fin, 4),    # dx = dy W_A
                         ("sddmm", kb, n, fin, fout, 4)]     # dW on all of B, one call
    assert set(times) == {"spmm", "spmm_t", "sddmm"} and all(t > 0 for t in times.values())
    # restored: the kernels are the library's own again
    layer(x).sum().backward()
    assert len(rec.calls) == 3


def test_call_shape_refuses_feature_major_calls():
    a = (torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
         torch.zeros(0), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="layout='feature'"):
        targets.call_shape("spmm", a, {"layout": "feature"})
    with pytest.raises(ValueError, match="unknown product"):
        targets.call_shape("spmv", a, {"layout": "row"})


def test_the_roof_of_a_call_is_the_lower_of_format_roof_and_dense_gemm(monkeypatch):
    gk, sk = ("gather", 64, 2048, "float32"), ("stream", 1, "float32")
    monkeypatch.setattr(roofline, "_BEST", {("gemm",): 1e11, gk: 1e11, sk: 1e10})
    monkeypatch.setattr(targets, "_BEST", roofline._BEST)
    monkeypatch.setattr(targets, "measure_ceilings", lambda *a: (gk, sk))
    n, f = 512, 4096

    def expect(product, nnz):
        _, _, gathered, streamed, _ = roofline.traffic(product, nnz, n, f, f, 4)
        fmt = max(2 * nnz * n / 1e11, gathered / 1e11) + streamed / 1e10
        return fmt, 2 * n * f * f / 1e11
    sparse_fmt, dense = expect("spmm", f * f // 100)       # 1%: the format's roof is lower
    assert sparse_fmt < dense
    low = [("spmm", f * f // 100, n, f, f, 4)]
    assert targets.roof_of(targets.measure_calls(low)) == pytest.approx(sparse_fmt)
    full_fmt, dense = expect("sddmm", f * f // 2)           # 50%: the dense GEMM is lower
    assert dense < full_fmt
    both = targets.measure_calls([("sddmm", f * f // 2, n, f, f, 4)] + low)
    assert targets.roof_of(both) == pytest.approx(dense + sparse_fmt)
    # the roofs use the ceilings' best at the time they are summed, not when measured
    roofline._BEST[gk] = 2e11
    assert targets.roof_of(targets.measure_calls(low)) < sparse_fmt
