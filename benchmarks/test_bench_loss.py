"""Quick pytest-benchmark runs of the loss backends at small sizes (forward + backward).

    pytest benchmarks/test_bench_loss.py            # every registered backend this device runs
    pytest benchmarks/test_bench_loss.py --benchmark-json out.json

Not part of the test suite (it lives outside tests/); the full sweep with
memory is benchmarks/bench_loss.py.
"""
import pytest
import torch

from bench_loss import forward_backward, loss_function, make_inputs

from finelap.kernels import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SIZES = [("frame", 2048, 512, 128, 2), ("clip", 1024, 1024, 128, 1)]


@pytest.mark.parametrize("backend", registry.supporting(DEVICE, DTYPE))
@pytest.mark.parametrize("stream,M,N,D,K", SIZES)
def test_forward_backward(benchmark, backend, stream, M, N, D, K):
    inputs, leaves = make_inputs(stream, M, N, D, K, DTYPE, DEVICE)
    function = loss_function(stream, backend)
    synchronize = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        loss = forward_backward(function, inputs, leaves)
        synchronize()
        return loss

    loss = benchmark(run)
    expected = forward_backward(loss_function(stream, "reference"), inputs, leaves)
    assert torch.allclose(loss.float(), expected.float(), rtol=2e-2 if DTYPE == torch.bfloat16 else 1e-4)
