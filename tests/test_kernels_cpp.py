"""The C++ (CPU, OpenMP) sigmoid-loss backend against the float64 reference.

Loss and every gradient (rows, columns, scale, bias) are compared over shapes
that include 1, odd sizes and sizes that are not multiples of the tile; small
tiles are also forced so that small inputs cross many tile borders. The backend
is called through the public functions (backend="cpp"), which validate inputs
and compute the normaliser for every backend alike.
"""
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from finelap import kernels
from finelap.kernels import cpp, reference

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason="no C++ compiler to build the cpp backend")


@pytest.fixture(params=["default tiles", "small tiles"])
def tiles(request, monkeypatch):
    """Run with the shipped tile size and with 8 x 16 tiles (many tile borders)."""
    if request.param == "small tiles":
        monkeypatch.setattr(cpp, "ROW_BLOCK", 8)
        monkeypatch.setattr(cpp, "COLUMN_BLOCK", 16)
    return request.param


def embeddings(rows, cols, dim, dtype=torch.float64, seed=0):
    """L2-normalised random rows [rows, dim] and columns [cols, dim] in dtype."""
    generator = torch.Generator().manual_seed(seed)
    audio = F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(cols, dim, generator=generator, dtype=torch.float64), dim=1)
    return audio.to(dtype), text.to(dtype)


def frame_labels(rows, cols, active_slots, ignore_slots, clusters, seed=1):
    """phrase_cluster [cols], frame_active [rows, K] and frame_ignore [rows, J] or None, -1 padded."""
    generator = torch.Generator().manual_seed(seed)
    phrase_cluster = torch.randint(0, clusters, (cols,), generator=generator)
    frame_active = torch.randint(-1, clusters, (rows, active_slots), generator=generator)
    frame_ignore = None
    if ignore_slots is not None:
        frame_ignore = torch.randint(-1, clusters, (rows, ignore_slots), generator=generator)
    return phrase_cluster, frame_active, frame_ignore


cpp_frame = functools.partial(kernels.frame_sigmoid_loss, backend="cpp")
cpp_clip = functools.partial(kernels.clip_sigmoid_loss, backend="cpp")
CPP = {"frame_sigmoid_loss": cpp_frame, "clip_sigmoid_loss": cpp_clip}


def loss_and_grads(loss_fn, rows, cols, first_ids, second_ids, scale, bias, *extra):
    """The loss and its gradients w.r.t. rows, columns, scale and bias, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (rows, cols, scale, bias)]
    loss = loss_fn(leaves[0], leaves[1], first_ids, second_ids, leaves[2], leaves[3], *extra)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def assert_matches_reference(stream, rows, cols, first_ids, second_ids, scale, bias, *extra, rtol):
    """cpp on the given inputs vs the reference on their float64 values; gradients keep the dtypes."""
    loss, grads = loss_and_grads(CPP[stream], rows, cols, first_ids, second_ids, scale, bias, *extra)
    expected_loss, expected_grads = loss_and_grads(
        getattr(reference, stream), rows.double(), cols.double(), first_ids, second_ids,
        scale.double(), bias.double(), *extra,
    )
    assert loss.dtype == (torch.float64 if rows.dtype == torch.float64 else torch.float32) and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=rtol * 1e-3)
    for name, grad, expected, leaf in zip(("rows", "columns", "scale", "bias"), grads, expected_grads,
                                          (rows, cols, scale, bias)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        atol = rtol * max(expected.abs().max().item(), 1e-12)
        torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


FRAME_SHAPES = [
    # M, N, D, K, J (None: no ignore)
    (1, 1, 1, 1, None),
    (1, 7, 3, 2, 1),
    (5, 1, 2, 1, 2),
    (13, 29, 5, 3, None),
    (37, 70, 17, 2, 4),
    (300, 530, 9, 2, None),
    (261, 515, 33, 16, 20),
]


@pytest.mark.parametrize("rows,cols,dim,active_slots,ignore_slots", FRAME_SHAPES)
def test_frame_matches_reference_float64(tiles, rows, cols, dim, active_slots, ignore_slots):
    audio, text = embeddings(rows, cols, dim)
    labels = frame_labels(rows, cols, active_slots, ignore_slots, clusters=max(2, cols // 3))
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    assert_matches_reference("frame_sigmoid_loss", audio, text, *labels[:2], scale, bias, labels[2], rtol=1e-10)


@pytest.mark.parametrize("rows,cols,dim,captions_per_clip", [
    (1, 1, 1, 1), (1, 5, 4, 5), (7, 21, 3, 3), (33, 66, 13, 2), (300, 600, 10, 2),
])
def test_clip_matches_reference_float64(tiles, rows, cols, dim, captions_per_clip):
    audio, text = embeddings(rows, cols, dim)
    # Several captions per clip, ids that are negative, a shared group, and
    # captions (beyond rows * captions_per_clip) whose clip is absent.
    audio_group = torch.arange(rows) - 3
    audio_group[rows // 2:] = audio_group[0]
    text_group = (torch.arange(cols) // captions_per_clip) - 3
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    assert_matches_reference("clip_sigmoid_loss", audio, text, audio_group, text_group, scale, bias, rtol=1e-10)


def test_all_negative_rows_and_repeated_ids():
    audio, text = embeddings(40, 50, 8)
    phrase_cluster = torch.arange(50) % 7
    frame_active = torch.full((40, 3), -1)
    frame_active[::2, 0] = 3  # odd rows stay all-negative
    frame_active[::4, 1] = 3  # the same cluster twice in a row counts once
    frame_ignore = torch.full((40, 2), -1)
    frame_ignore[1::3] = torch.tensor([5, 5])
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert_matches_reference("frame_sigmoid_loss", audio, text, phrase_cluster, frame_active, scale, bias,
                             frame_ignore, rtol=1e-10)


def test_zero_counted_entries_give_zero_loss_and_gradients():
    audio, text = embeddings(9, 12, 4)
    phrase_cluster = torch.arange(12) % 3
    frame_active = torch.tensor([[0, -1]]).repeat(9, 1)
    frame_ignore = torch.tensor([[0, 1, 2]]).repeat(9, 1)  # every phrase's cluster
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    loss, grads = loss_and_grads(cpp_frame, audio, text, phrase_cluster, frame_active,
                                 scale, bias, frame_ignore)
    expected, _ = loss_and_grads(reference.frame_sigmoid_loss, audio, text, phrase_cluster, frame_active,
                                 scale, bias, frame_ignore)
    assert loss.item() == expected.item() == 0.0
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("stream", ["frame_sigmoid_loss", "clip_sigmoid_loss"])
def test_low_precision_matches_float64_reference(stream, dtype, rtol):
    audio, text = embeddings(300, 700, 24, dtype=dtype, seed=3)
    if stream == "frame_sigmoid_loss":
        first_ids, second_ids, ignore = frame_labels(300, 700, 2, 3, clusters=100)
        extra = (ignore,)
    else:
        first_ids, second_ids, extra = torch.arange(300), torch.arange(700) % 350, ()
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)  # float32 logit parameters, as in a model
    assert_matches_reference(stream, audio, text, first_ids, second_ids, scale, bias, *extra, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias_value", [0.0, 5000.0, -5000.0])
def test_extreme_logits_are_finite_and_match(dtype, bias_value):
    """|z| up to 1e4: softplus and sigmoid must neither overflow nor lose the linear regime."""
    audio, text = embeddings(20, 30, 6, dtype=dtype, seed=4)
    phrase_cluster, frame_active, frame_ignore = frame_labels(20, 30, 2, 1, clusters=6)
    scale, bias = torch.tensor(5000.0, dtype=dtype), torch.tensor(bias_value, dtype=dtype)
    loss, grads = loss_and_grads(cpp_frame, audio, text, phrase_cluster, frame_active,
                                 scale, bias, frame_ignore)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_matches_reference("frame_sigmoid_loss", audio, text, phrase_cluster, frame_active, scale, bias,
                             frame_ignore, rtol=1e-5 if dtype == torch.float32 else 1e-10)


def test_inputs_are_not_modified():
    audio, text = embeddings(70, 90, 12, dtype=torch.float32)
    labels = frame_labels(70, 90, 2, 2, clusters=20)
    inputs = (audio, text, labels[0], labels[1], torch.tensor(3.0), torch.tensor(-1.0), labels[2])
    before = [t.clone() for t in inputs]
    loss_and_grads(cpp_frame, *inputs)
    loss_and_grads(cpp_clip, audio, text, torch.arange(70), torch.arange(90), *inputs[4:6])
    for original, now in zip(before, inputs):
        assert torch.equal(original, now)


def test_thread_count_does_not_change_the_result(monkeypatch):
    monkeypatch.setattr(cpp, "ROW_BLOCK", 16)
    monkeypatch.setattr(cpp, "COLUMN_BLOCK", 64)
    audio, text = embeddings(500, 300, 32, dtype=torch.float32, seed=5)
    labels = frame_labels(500, 300, 2, 1, clusters=40)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_and_grads(cpp_frame, audio, text, *labels[:2], scale, bias, labels[2])
        torch.set_num_threads(4)
        multi = loss_and_grads(cpp_frame, audio, text, *labels[:2], scale, bias, labels[2])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(multi[0], single[0], rtol=1e-5, atol=1e-7)
    for multi_grad, single_grad in zip(multi[1], single[1]):
        torch.testing.assert_close(multi_grad, single_grad, rtol=1e-5, atol=1e-5 * single_grad.abs().max().item())


def test_forward_only_and_partial_gradients():
    audio, text = embeddings(50, 60, 8, dtype=torch.float32)
    labels = frame_labels(50, 60, 2, 1, clusters=15)
    scale, bias = torch.tensor(6.0), torch.tensor(-2.0)
    full_loss, full_grads = loss_and_grads(cpp_frame, audio, text, *labels[:2], scale, bias, labels[2])
    with torch.no_grad():
        forward_only = cpp_frame(audio, text, *labels[:2], scale, bias, labels[2])
    assert not forward_only.requires_grad
    torch.testing.assert_close(forward_only, full_loss, rtol=1e-6, atol=0)

    # Only the logit parameters require grad; the upstream gradient is not 1.
    scale_leaf, bias_leaf = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = cpp_frame(audio, text, *labels[:2], scale_leaf, bias_leaf, labels[2])
    (2.5 * loss).backward()
    torch.testing.assert_close(scale_leaf.grad, 2.5 * full_grads[2])
    torch.testing.assert_close(bias_leaf.grad, 2.5 * full_grads[3])


def test_missing_compiler_makes_the_backend_unavailable_with_one_warning(tmp_path):
    """A fresh build with no working compiler: is_available() is False, warns once, calls raise."""
    probe = textwrap.dedent("""
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from finelap.kernels import clip_sigmoid_loss, cpp
            answers = [cpp.is_available(), cpp.is_available()]
            try:
                clip_sigmoid_loss(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, dtype=torch.long),
                                  torch.zeros(1, dtype=torch.long), torch.tensor(1.0), torch.tensor(0.0),
                                  backend="cpp")
                error = ""
            except ValueError as raised:
                error = str(raised)
        ours = [str(w.message) for w in caught if "cpp sigmoid-loss backend unavailable" in str(w.message)]
        print(json.dumps({"answers": answers, "warnings": ours, "error": error}))
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), CXX=str(tmp_path / "no-compiler"))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["answers"] == [False, False]
    assert len(report["warnings"]) == 1 and "sigmoid_loss.cpp did not build" in report["warnings"][0]
    assert "backend 'cpp' is unavailable: the C++ extension could not be built" in report["error"]


@pytest.mark.slow
def test_installed_wheel_ships_and_builds_the_cpp_source(tmp_path):
    """A non-editable install (a wheel) carries csrc/ as package data and the backend builds from
    that copy: the result of a call matches the reference."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), repo],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("finelap-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = textwrap.dedent("""
        import json, torch
        from finelap.kernels import cpp, frame_sigmoid_loss, reference
        frames, phrases = torch.randn(9, 5).double(), torch.randn(7, 5).double()
        labels = (torch.arange(7) % 3, torch.randint(-1, 3, (9, 2)), torch.tensor(2.0), torch.tensor(-1.0))
        got = frame_sigmoid_loss(frames.float(), phrases.float(), *labels, backend="cpp")
        want = reference.frame_sigmoid_loss(frames.float().double(), phrases.float().double(), *labels)
        print(json.dumps({"source": str(cpp.SOURCE), "error": abs(got.item() - want.item())}))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == str(tmp_path / "site" / "finelap" / "kernels" / "csrc" / "sigmoid_loss.cpp")
    assert report["error"] < 1e-5
    assert any((tmp_path / "extensions").rglob("*.so")), "the extension was not built from the installed copy"
