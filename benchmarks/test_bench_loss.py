"""Quick pytest-benchmark runs of the loss backends at small sizes (forward + backward).

    pytest benchmarks/test_bench_loss.py            # CPU: reference, chunked, cpp
    pytest benchmarks/test_bench_loss.py --benchmark-json out.json

Not part of the test suite (it lives outside tests/); the full sweep with
memory is benchmarks/bench_loss.py.
"""
import pytest
import torch

from bench_loss import forward_backward, loss_function, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "chunked"] + (["triton", "triton_gemm", "triton_pass"] if DEVICE == "cuda" else ["cpp"])
SIZES = [("frame", 2048, 512, 128, 2), ("clip", 1024, 1024, 128, 1)]


def _cpp_available():
    try:
        from finelap.kernels import cpp
    except ImportError:
        return False
    return cpp.is_available()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stream,M,N,D,K", SIZES)
def test_forward_backward(benchmark, backend, stream, M, N, D, K):
    if backend == "cpp" and not _cpp_available():
        pytest.skip("finelap.kernels.cpp is absent or could not build")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inputs, leaves = make_inputs(stream, M, N, D, K, dtype, DEVICE)
    function = loss_function(stream, backend)
    synchronize = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        loss = forward_backward(function, inputs, leaves)
        synchronize()
        return loss

    loss = benchmark(run)
    expected = forward_backward(loss_function(stream, "reference"), inputs, leaves)
    assert torch.allclose(loss.float(), expected.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)
