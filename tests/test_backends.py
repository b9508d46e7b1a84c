"""The dispatch point: the whole engine through the Triton kernels (in Triton's
interpreter on CPU tensors) against the dense reference, device/dtype errors, and
the same engine on a real GPU when there is one."""
from __future__ import annotations

import contextlib

import pytest
import torch

import sparsecore as sc
from sparsecore import kernels

from reference import DenseTopKAST

triton_backend = pytest.importorskip("sparsecore.kernels.triton_backend")
needs_interpreter = pytest.mark.skipif(not triton_backend.INTERPRET,
                                       reason="needs TRITON_INTERPRET=1 before triton import")


def _train_against_reference(device, backend):
    torch.manual_seed(0)
    with kernels.use_backend(backend) if backend else contextlib.nullcontext():
        layer = sc.TopKASTLinear(24, 16, forward_sparsity=0.75, backward_sparsity=0.5,
                                 exploration=0.3, seed=5, device=device)
        ref = DenseTopKAST(layer.to_dense().double(), layer.bias.detach().double().cpu(),
                           k_a=layer.k_a, k_b=layer.k_b, exploration=0.3, density=0.25)
        opt_e = torch.optim.Adam(layer.parameters(), lr=0.05)
        opt_r = torch.optim.Adam(ref.parameters(), lr=0.05)
        changed = 0.0
        for step in range(6):
            x = torch.randn(10, 24)
            t = torch.randn(10, 16)
            opt_e.zero_grad()
            torch.nn.functional.mse_loss(layer(x.to(device)), t.to(device)).backward()
            opt_e.step()
            opt_r.zero_grad()
            torch.nn.functional.mse_loss(ref(x.double()), t.double()).backward()
            ref.step(opt_r)
            if step % 2 == 1:
                changed += layer.refresh(opt_e)["changed_a"]
                ref.refresh(opt_r)
            assert torch.equal(layer.active_indices(), ref.active_indices()), step
            assert torch.equal(layer.backward_indices(), ref.backward_indices()), step
            torch.testing.assert_close(layer.to_dense().double(), ref.theta.detach(),
                                       rtol=0, atol=2e-5)
        assert changed > 0, "the run must cross a refresh that changes A"


@needs_interpreter
def test_engine_through_triton_interpreter_equals_reference():
    _train_against_reference("cpu", "triton")


@needs_interpreter
def test_triton_backend_is_float32_only():
    with kernels.use_backend("triton"):
        assert kernels.backend_name("cpu") == "triton"
        with pytest.raises(TypeError, match="float32"):
            sc.TopKASTLinear(8, 4, forward_sparsity=0.5, backward_sparsity=0.5,
                             dtype=torch.float64)
    assert kernels.backend_name("cpu") == "numba-cpu"


def test_dispatch_errors():
    with pytest.raises(NotImplementedError, match="no kernel backend for device meta"):
        kernels.backend_name("meta")
    with pytest.raises(ValueError, match="'numba-cpu' or 'triton'"):
        with kernels.use_backend("cusparse"):
            pass
    layer = sc.TopKASTLinear(8, 4, forward_sparsity=0.5, backward_sparsity=0.5)
    with pytest.raises(NotImplementedError, match="meta"):
        layer.to("meta")
    assert layer.values.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_equals_reference():
    _train_against_reference("cuda", None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_layer_on_cuda_equals_eager(bias):
    """torch.compile(fullgraph=True) of a layer on the GPU gives the eager output and
    gradients bit for bit (its fake implementation must match the real strides: the
    first H200 run of this failed inductor's stride assertion)."""
    torch.manual_seed(0)
    m = sc.TopKASTLinear(64, 32, forward_sparsity=0.8, backward_sparsity=0.5, bias=bias).cuda()
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    outs = []
    for f in (torch.compile(m, fullgraph=True), m):
        m.values.grad = x.grad = None
        y = f(x)
        y.square().sum().backward()
        outs.append((y.detach(), m.values.grad.clone(), x.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


IMPORT_PROBE = r"""
import os, sys, warnings
warnings.simplefilter("error")          # any warning at import fails the probe
if sys.argv[1] == "torch_first":
    import torch
    import sparsecore
else:
    import sparsecore
    import torch
l = sparsecore.TopKASTLinear(64, 64, forward_sparsity=0.5, backward_sparsity=0.2)
l(torch.randn(256, 64)).sum().backward()     # runs parallel Numba kernels
print(os.environ.get("OMP_WAIT_POLICY", "unset"))
"""


@pytest.mark.parametrize("order", ["torch_first", "sparsecore_first"])
def test_import_order_changes_nothing(order):
    """sparsecore leaves the OpenMP environment as it found it and warns about nothing,
    whichever is imported first, so torch's and the kernels' wait policy cannot depend
    on import order."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, order], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["unset"]
