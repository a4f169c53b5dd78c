"""DualStreamSigmoidLoss in one process against direct float64 computations from the Batch.

The expected values are built entry by entry from the batch's ids (Python
loops over clips, frames and phrases), not with the kernels' helpers.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from finelap.config import LossConfig
from finelap.data.batch import Batch
from finelap.kernels import registry
from finelap.losses import DualStreamSigmoidLoss
from finelap.models.outputs import FineLAPOutput

FRAMES = 6
WIDTH = 5
LENGTHS = [6, 6, 4, 5]  # valid frames per clip
ANNOTATED = [True, False, True, True]
CAPTION_CLIP = [0, 1, 1, 2, 3]  # clip 1 has two captions
CLIP_GROUP = [7, 3, 9, 4]
PHRASE_CLUSTER = [0, 1, 1, 2, 3, 4]  # phrases 1 and 2 are synonyms (cluster 1)
CLIP_PHRASE_INDEX = [[0, 2, -1], [-1, -1, -1], [1, 3, 5], [4, 0, -1]]


def make_batch(seed: int = 0, with_ignore: bool = True, annotated=ANNOTATED) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    clips, phrases = len(CLIP_GROUP), len(PHRASE_CLUSTER)
    active_choices = torch.tensor([-1, 0, 1, 2, 3, 4, 8])  # 8: a cluster no phrase belongs to
    ignore_choices = torch.tensor([-1, -1, 1, 1, 3, 8])  # repeated ids in a row count once
    frame_active = active_choices[torch.randint(len(active_choices), (clips, FRAMES, 2), generator=generator)]
    frame_ignore = ignore_choices[torch.randint(len(ignore_choices), (clips, FRAMES, 3), generator=generator)]
    return Batch(
        audio_ids=[f"clip{index}" for index in range(clips)],
        waveforms=torch.zeros(clips, 32),
        lengths=torch.full((clips,), 32),
        captions=[f"caption {index}" for index in range(len(CAPTION_CLIP))],
        caption_clip=torch.tensor(CAPTION_CLIP),
        clip_group=torch.tensor(CLIP_GROUP),
        annotated=torch.tensor(annotated),
        phrases=[f"phrase {index}" for index in range(phrases)],
        phrase_id=torch.tensor([101, 205, 333, 47, 58, 612]),
        phrase_cluster=torch.tensor(PHRASE_CLUSTER),
        frame_active=frame_active,
        frame_ignore=frame_ignore if with_ignore else None,
        clip_phrase_index=torch.tensor(CLIP_PHRASE_INDEX),
        clip_phrase_labels=torch.randint(2, (clips, 3, FRAMES), generator=generator).double(),
        sample_index=torch.arange(clips),
    )


def make_output(seed: int = 1, dtype=torch.float64) -> FineLAPOutput:
    """Leaf tensors (requires_grad), embeddings L2-normalised."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        values = F.normalize(torch.randn(*shape, WIDTH, generator=generator, dtype=torch.float64), dim=-1)
        return values.to(dtype).requires_grad_()

    def scalar(value):
        return torch.tensor(value, dtype=dtype, requires_grad=True)

    return FineLAPOutput(
        clip_embeddings=leaf(len(CLIP_GROUP)),
        frame_embeddings=leaf(len(CLIP_GROUP), FRAMES),
        frame_mask=torch.arange(FRAMES)[None, :] < torch.tensor(LENGTHS)[:, None],
        caption_embeddings=leaf(len(CAPTION_CLIP)),
        phrase_embeddings=leaf(len(PHRASE_CLUSTER)),
        clip_scale=scalar(4.0), clip_bias=scalar(-1.5),
        frame_scale=scalar(6.0), frame_bias=scalar(-2.0),
        frame_hop_seconds=0.16,
        padded_text_tokens=0,  # no text tower here
    )


def leaves(output: FineLAPOutput) -> dict:
    return {name: getattr(output, name) for name in (
        "clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings",
        "clip_scale", "clip_bias", "frame_scale", "frame_bias")}


def direct_clip_loss(output: FineLAPOutput, batch: Batch) -> torch.Tensor:
    """sum over (clip, caption) of softplus(-y z) / clips, y = +1 iff the caption describes that clip's group."""
    signs = [[1.0 if batch.clip_group[clip] == batch.clip_group[batch.caption_clip[caption]] else -1.0
              for caption in range(len(batch.captions))] for clip in range(len(batch.audio_ids))]
    logits = output.clip_scale * output.clip_embeddings @ output.caption_embeddings.t() + output.clip_bias
    return F.softplus(-torch.tensor(signs, dtype=logits.dtype) * logits).sum() / len(batch.audio_ids)


def direct_frame_entries(batch: Batch):
    """(row (clip, frame), phrase, sign) for every counted entry of the batch-negatives frame stream."""
    entries = []
    for clip in range(len(batch.audio_ids)):
        if not batch.annotated[clip]:
            continue
        for frame in range(LENGTHS[clip]):
            active = set(batch.frame_active[clip, frame].tolist()) - {-1}
            ignored = set() if batch.frame_ignore is None else set(batch.frame_ignore[clip, frame].tolist()) - {-1}
            for phrase, cluster in enumerate(batch.phrase_cluster.tolist()):
                if cluster not in ignored:
                    entries.append(((clip, frame), phrase, 1.0 if cluster in active else -1.0))
    return entries


def direct_frame_loss(output: FineLAPOutput, batch: Batch) -> torch.Tensor:
    entries = direct_frame_entries(batch)
    if not entries:
        return output.frame_scale.new_zeros(())
    total = 0
    for (clip, frame), phrase, sign in entries:
        similarity = output.frame_embeddings[clip, frame] @ output.phrase_embeddings[phrase]
        total = total + F.softplus(-sign * (output.frame_scale * similarity + output.frame_bias))
    return total / len(entries)


def direct_per_clip_loss(output: FineLAPOutput, batch: Batch) -> torch.Tensor:
    """The reference's recipe: sigmoid of each clip's own phrase-frame logits, then BCE, mean over entries."""
    logits, labels = [], []
    for clip in range(len(batch.audio_ids)):
        if not batch.annotated[clip]:
            continue
        for slot, phrase in enumerate(batch.clip_phrase_index[clip].tolist()):
            if phrase < 0:
                continue
            for frame in range(LENGTHS[clip]):
                similarity = output.frame_embeddings[clip, frame] @ output.phrase_embeddings[phrase]
                logits.append(output.frame_scale * similarity + output.frame_bias)
                labels.append(batch.clip_phrase_labels[clip, slot, frame])
    return F.binary_cross_entropy(torch.sigmoid(torch.stack(logits)), torch.stack(labels))


def check_against_direct(loss_module, expected_fn, batch, output_seed=1):
    """Runs the module and the direct computation on identical leaves; compares loss and every gradient."""
    output = make_output(output_seed)
    result = loss_module(output, batch)
    result.loss.backward()
    reference_output = make_output(output_seed)
    expected = expected_fn(reference_output, batch)
    expected.backward()
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-10, atol=1e-12)
    for name, tensor in leaves(output).items():
        expected_gradient = getattr(reference_output, name).grad
        if expected_gradient is None:
            assert tensor.grad is None or tensor.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(tensor.grad, expected_gradient, rtol=1e-9, atol=1e-12, msg=name)
    return result, output


FLOAT64_BACKENDS = registry.supporting("cpu", torch.float64)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("with_ignore", [True, False])
def test_batch_mode_equals_direct_computation(backend, with_ignore):
    batch = make_batch(with_ignore=with_ignore)
    module = DualStreamSigmoidLoss(alpha=0.7, beta=1.3, backend=backend)

    def expected(output, batch):
        return 0.7 * direct_clip_loss(output, batch) + 1.3 * direct_frame_loss(output, batch)

    result, output = check_against_direct(module, expected, batch)
    reference_output = make_output()
    torch.testing.assert_close(result.clip_loss, direct_clip_loss(reference_output, batch).detach())
    torch.testing.assert_close(result.frame_loss, direct_frame_loss(reference_output, batch).detach())
    entries = direct_frame_entries(batch)
    valid_annotated_frames = sum(length for length, annotated in zip(LENGTHS, ANNOTATED) if annotated)
    assert (result.clip_rows, result.caption_columns) == (4, 5)
    assert (result.frame_rows, result.phrase_columns, result.frame_entries) == (valid_annotated_frames, 6, len(entries))
    if with_ignore:
        assert len(entries) < valid_annotated_frames * 6
    # Frames outside the mask and frames of the caption-only clip are not rows: no gradient reaches them.
    frame_gradient = output.frame_embeddings.grad
    assert frame_gradient[1].abs().max() == 0
    assert frame_gradient[2, LENGTHS[2]:].abs().max() == 0 and frame_gradient[3, LENGTHS[3]:].abs().max() == 0
    assert frame_gradient[0].abs().min() > 0


def test_per_clip_mode_equals_the_reference_bce():
    batch = make_batch()
    module = DualStreamSigmoidLoss(alpha=0.4, beta=2.0, frame_negatives="per_clip", backend="reference")

    def expected(output, batch):
        return 0.4 * direct_clip_loss(output, batch) + 2.0 * direct_per_clip_loss(output, batch)

    result, output = check_against_direct(module, expected, batch)
    # Annotated clips 0, 2, 3 hold 2, 3, 2 phrases over 6, 4, 5 valid frames.
    assert (result.phrase_columns, result.frame_entries) == (2 + 3 + 2, 2 * 6 + 3 * 4 + 2 * 5)
    assert output.frame_embeddings.grad[1].abs().max() == 0
    assert output.phrase_embeddings.grad.abs().min() > 0


@pytest.mark.parametrize("frame_negatives", ["batch", "per_clip"])
def test_frame_only_mode_skips_the_clip_stream(frame_negatives):
    batch = make_batch()
    direct = direct_frame_loss if frame_negatives == "batch" else direct_per_clip_loss
    module = DualStreamSigmoidLoss(alpha=5.0, beta=0.5, mode="frame_only", frame_negatives=frame_negatives,
                                   backend="reference")
    result, output = check_against_direct(module, lambda output, batch: 0.5 * direct(output, batch), batch)
    assert result.clip_loss == 0 and (result.clip_rows, result.caption_columns) == (0, 0)
    assert output.clip_embeddings.grad is None and output.caption_embeddings.grad is None


def test_clip_only_mode_skips_the_frame_stream():
    batch = make_batch()
    module = DualStreamSigmoidLoss(alpha=0.5, beta=3.0, mode="clip_only", backend="reference")
    result, output = check_against_direct(module, lambda output, batch: 0.5 * direct_clip_loss(output, batch), batch)
    assert result.frame_loss == 0 and (result.frame_rows, result.phrase_columns, result.frame_entries) == (0, 0, 0)
    assert output.frame_embeddings.grad is None and output.phrase_embeddings.grad is None


@pytest.mark.parametrize("frame_negatives", ["batch", "per_clip"])
def test_batch_without_annotated_clips_has_zero_frame_loss_but_backpropagates(frame_negatives):
    batch = make_batch(annotated=[False] * len(CLIP_GROUP))
    module = DualStreamSigmoidLoss(frame_negatives=frame_negatives, backend="reference")
    result, output = check_against_direct(module, direct_clip_loss, batch)
    assert result.frame_loss == 0 and result.frame_rows == 0 and result.frame_entries == 0
    assert output.frame_embeddings.grad is not None and output.frame_embeddings.grad.abs().max() == 0
    assert output.frame_bias.grad == 0


def test_float32_inputs_give_a_float32_loss_close_to_float64():
    batch = make_batch()
    module = DualStreamSigmoidLoss(backend="reference")
    result32 = module(make_output(dtype=torch.float32), batch)
    result64 = module(make_output(dtype=torch.float64), batch)
    assert result32.loss.dtype == torch.float32 and result64.loss.dtype == torch.float64
    assert math.isclose(result32.loss.item(), result64.loss.item(), rel_tol=1e-5)


def test_from_config_reads_every_field():
    config = LossConfig(alpha=0.25, beta=4.0, mode="frame_only", frame_negatives="per_clip", backend="chunked")
    module = DualStreamSigmoidLoss.from_config(config)
    assert (module.alpha, module.beta, module.mode, module.frame_negatives, module.backend) == (
        0.25, 4.0, "frame_only", "per_clip", "chunked")


def test_invalid_settings_are_rejected_with_the_key():
    with pytest.raises(ValueError, match=r"loss mode must be one of .*'both'"):
        DualStreamSigmoidLoss(mode="both")
    with pytest.raises(ValueError, match=r"loss frame_negatives must be one of .*'global'"):
        DualStreamSigmoidLoss(frame_negatives="global")


def test_mismatched_output_and_batch_name_the_fields():
    batch = make_batch()
    batch.frame_active = batch.frame_active[:, :4]
    with pytest.raises(ValueError, match=r"output.frame_embeddings \[B, T\] is \(4, 6\) but batch.frame_active "
                                         r"\[B, T\] is \(4, 4\)"):
        DualStreamSigmoidLoss(backend="reference")(make_output(), batch)
    batch = make_batch()
    output = make_output()
    output.phrase_embeddings = output.phrase_embeddings[:5]
    with pytest.raises(ValueError, match=r"output.phrase_embeddings rows is 5 but batch.phrase_id is 6"):
        DualStreamSigmoidLoss(backend="reference")(output, batch)
