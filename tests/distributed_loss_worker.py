"""Two-rank loss scenarios: the batches, a tiny shared model, and the spawned worker.

Each rank holds a different share of one global batch (different numbers of
clips, captions and phrases; a phrase present on both ranks). The embeddings
come from shared parameters applied to fixed per-rank inputs, so gradients
can be averaged over ranks as data-parallel training does and compared with
one process over the concatenated batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finelap.data.batch import Batch
from finelap.kernels import clip_sigmoid_loss
from finelap.losses import DualStreamSigmoidLoss
from finelap.models.outputs import FineLAPOutput

WORLD_SIZE = 2
FEATURES = 6
EMBEDDING = 5
FRAMES = 5
PHRASES_PER_CLIP = 3
CLUSTER_OF_PHRASE = {0: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 0}  # phrase index -> cluster id (synonyms share one)

# name -> (rank batches variant, loss keyword arguments)
SCENARIOS = {
    "dual_batch": ("mixed", dict(alpha=0.7, beta=1.3)),
    "dual_per_clip": ("mixed", dict(alpha=0.7, beta=1.3, frame_negatives="per_clip")),
    "frame_only_batch": ("mixed", dict(mode="frame_only")),
    "clip_only": ("mixed", dict(mode="clip_only")),
    "rank_without_annotated_batch": ("rank1_unannotated", dict()),
    "rank_without_annotated_per_clip": ("rank1_unannotated", dict(frame_negatives="per_clip")),
}


@dataclass
class Inputs:
    """Fixed inputs of the tiny model for one batch."""

    clips: torch.Tensor  # [B, FEATURES]
    frames: torch.Tensor  # [B, FRAMES, FEATURES]
    frame_mask: torch.Tensor  # [B, FRAMES] bool
    captions: torch.Tensor  # [Nc, FEATURES]
    phrases: torch.Tensor  # [P, FEATURES]


class TinyTowers(nn.Module):
    """Linear towers and learnable logit parameters: identical on every rank for a given seed."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.audio = nn.Linear(FEATURES, EMBEDDING)
        self.frame = nn.Linear(FEATURES, EMBEDDING)
        self.text = nn.Linear(FEATURES, EMBEDDING)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
        self.log_clip_scale = nn.Parameter(torch.tensor(1.2))
        self.clip_bias = nn.Parameter(torch.tensor(-0.8))
        self.log_frame_scale = nn.Parameter(torch.tensor(1.5))
        self.frame_bias = nn.Parameter(torch.tensor(-1.1))

    def forward(self, inputs: Inputs) -> FineLAPOutput:
        return FineLAPOutput(
            clip_embeddings=F.normalize(self.audio(inputs.clips), dim=-1),
            frame_embeddings=F.normalize(self.frame(inputs.frames), dim=-1),
            frame_mask=inputs.frame_mask,
            caption_embeddings=F.normalize(self.text(inputs.captions), dim=-1),
            phrase_embeddings=F.normalize(self.text(inputs.phrases), dim=-1),
            clip_scale=self.log_clip_scale.exp(),
            clip_bias=self.clip_bias,
            frame_scale=self.log_frame_scale.exp(),
            frame_bias=self.frame_bias,
            frame_hop_seconds=0.16,
            padded_text_tokens=0,  # no text tower here
        )


def _make_rank(generator, phrase_table, first_group, annotated, captions_per_clip, phrase_indices, lengths):
    """One rank's share: Inputs and Batch. phrase_indices index the global phrase table (same text, same id)."""
    clips = len(annotated)
    annotated = torch.tensor(annotated, dtype=torch.bool)
    caption_clip = torch.tensor([clip for clip, count in enumerate(captions_per_clip) for _ in range(count)])
    frame_mask = torch.arange(FRAMES)[None, :] < torch.tensor(lengths)[:, None]
    present_clusters = sorted({CLUSTER_OF_PHRASE[index] for index in phrase_indices}) + [9]  # 9: no phrase
    choices = torch.tensor([-1] + present_clusters)
    frame_active = choices[torch.randint(len(choices), (clips, FRAMES, 2), generator=generator)]
    ignore_choices = torch.tensor([-1, -1, 1, 3, 3])  # cluster 1 has two phrases; repeats count once
    frame_ignore = ignore_choices[torch.randint(len(ignore_choices), (clips, FRAMES, 2), generator=generator)]
    clip_phrase_index = torch.full((clips, PHRASES_PER_CLIP), -1)
    for clip in range(clips):
        if annotated[clip] and phrase_indices:
            count = min(len(phrase_indices), 1 + clip % PHRASES_PER_CLIP)
            clip_phrase_index[clip, :count] = torch.randperm(len(phrase_indices), generator=generator)[:count]
    labels = torch.randint(2, (clips, PHRASES_PER_CLIP, FRAMES), generator=generator).float()
    inputs = Inputs(
        clips=torch.randn(clips, FEATURES, generator=generator),
        frames=torch.randn(clips, FRAMES, FEATURES, generator=generator),
        frame_mask=frame_mask,
        captions=torch.randn(len(caption_clip), FEATURES, generator=generator),
        phrases=phrase_table[phrase_indices].reshape(len(phrase_indices), FEATURES),
    )
    batch = Batch(
        audio_ids=[f"clip{first_group + clip}" for clip in range(clips)],
        waveforms=torch.zeros(clips, 16),
        lengths=torch.full((clips,), 16),
        captions=[f"caption {index}" for index in range(len(caption_clip))],
        caption_clip=caption_clip,
        clip_group=torch.arange(first_group, first_group + clips),
        annotated=annotated,
        phrases=[f"phrase {index}" for index in phrase_indices],
        phrase_id=torch.tensor([1000 + index for index in phrase_indices], dtype=torch.int64),
        phrase_cluster=torch.tensor([CLUSTER_OF_PHRASE[index] for index in phrase_indices], dtype=torch.int64),
        frame_active=frame_active,
        frame_ignore=frame_ignore,
        clip_phrase_index=clip_phrase_index,
        clip_phrase_labels=labels,
        sample_index=torch.arange(first_group, first_group + clips),
    )
    return inputs, batch


def rank_shares(variant: str) -> list[tuple[Inputs, Batch]]:
    """The two ranks' (Inputs, Batch); phrase 2 sits on both ranks in "mixed"."""
    generator = torch.Generator().manual_seed(7)
    phrase_table = torch.randn(len(CLUSTER_OF_PHRASE), FEATURES, generator=generator)
    rank0 = _make_rank(generator, phrase_table, first_group=0, annotated=[True, False, True],
                       captions_per_clip=[1, 2, 1], phrase_indices=[0, 1, 2, 3], lengths=[5, 4, 3])
    if variant == "mixed":
        rank1 = _make_rank(generator, phrase_table, first_group=3, annotated=[True, True],
                           captions_per_clip=[1, 1], phrase_indices=[2, 4, 5], lengths=[4, 5])
    else:
        rank1 = _make_rank(generator, phrase_table, first_group=3, annotated=[False, False],
                           captions_per_clip=[1, 1], phrase_indices=[], lengths=[4, 5])
    return [rank0, rank1]


def concatenate(shares: list[tuple[Inputs, Batch]]) -> tuple[Inputs, Batch]:
    """The global batch one process would see: clips in rank order, phrases de-duplicated by id."""
    batches = [batch for _, batch in shares]
    phrase_ids, phrase_rows = [], []
    for rank, batch in enumerate(batches):
        for local, phrase_id in enumerate(batch.phrase_id.tolist()):
            if phrase_id not in phrase_ids:
                phrase_ids.append(phrase_id)
                phrase_rows.append((rank, local))
    clip_offsets = torch.tensor([0] + [len(batch.audio_ids) for batch in batches]).cumsum(0).tolist()
    clip_phrase_index = []
    for batch in batches:
        global_position = torch.tensor([phrase_ids.index(i) for i in batch.phrase_id.tolist()] + [-1])
        clip_phrase_index.append(global_position[batch.clip_phrase_index])  # -1 maps to the appended -1
    cat = lambda name: torch.cat([getattr(batch, name) for batch in batches])  # noqa: E731
    batch = Batch(
        audio_ids=sum((batch.audio_ids for batch in batches), []),
        waveforms=cat("waveforms"),
        lengths=cat("lengths"),
        captions=sum((batch.captions for batch in batches), []),
        caption_clip=torch.cat([batch.caption_clip + offset for batch, offset in zip(batches, clip_offsets)]),
        clip_group=cat("clip_group"),
        annotated=cat("annotated"),
        phrases=[batches[rank].phrases[local] for rank, local in phrase_rows],
        phrase_id=torch.tensor(phrase_ids, dtype=torch.int64),
        phrase_cluster=torch.stack([batches[rank].phrase_cluster[local] for rank, local in phrase_rows]),
        frame_active=cat("frame_active"),
        frame_ignore=cat("frame_ignore"),
        clip_phrase_index=torch.cat(clip_phrase_index),
        clip_phrase_labels=cat("clip_phrase_labels"),
        sample_index=cat("sample_index"),
    )
    inputs = Inputs(
        clips=torch.cat([inputs.clips for inputs, _ in shares]),
        frames=torch.cat([inputs.frames for inputs, _ in shares]),
        frame_mask=torch.cat([inputs.frame_mask for inputs, _ in shares]),
        captions=torch.cat([inputs.captions for inputs, _ in shares]),
        phrases=torch.stack([shares[rank][0].phrases[local] for rank, local in phrase_rows]),
    )
    return inputs, batch


def run_loss(inputs: Inputs, batch: Batch, loss_kwargs: dict) -> dict:
    """Loss, logged values, counts and parameter gradients (this process only) for one step."""
    model = TinyTowers()
    result = DualStreamSigmoidLoss(backend="reference", **loss_kwargs)(model(inputs), batch)
    result.loss.backward()
    return {
        "loss": result.loss.detach(),
        "clip_loss": result.clip_loss,
        "frame_loss": result.frame_loss,
        "counts": (result.clip_rows, result.caption_columns, result.frame_rows, result.phrase_columns,
                   result.frame_entries),
        "gradients": {name: parameter.grad.clone() if parameter.grad is not None else torch.zeros_like(parameter)
                      for name, parameter in model.named_parameters()},
    }


def naive_gather_clip_gradients(inputs: Inputs, batch: Batch) -> dict:
    """The pitfall: captions gathered with plain dist.all_gather, only the local slot carrying gradient."""
    model = TinyTowers()
    output = model(inputs)
    largest = 8  # more captions than any rank holds
    local = output.caption_embeddings
    padded = torch.cat([local.detach(), local.new_zeros(largest - local.shape[0], EMBEDDING)])
    slots = [torch.empty_like(padded) for _ in range(WORLD_SIZE)]
    dist.all_gather(slots, padded)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(WORLD_SIZE)]
    dist.all_gather(counts, torch.tensor([local.shape[0]]))
    groups = [torch.empty(largest, dtype=torch.int64) for _ in range(WORLD_SIZE)]
    dist.all_gather(groups, torch.cat([batch.caption_group, torch.full((largest - local.shape[0],), -1)]))
    rank = dist.get_rank()
    slots[rank] = torch.cat([local, padded[local.shape[0]:]])
    captions = torch.cat([slot[:int(count)] for slot, count in zip(slots, counts)])
    caption_group = torch.cat([group[:int(count)] for group, count in zip(groups, counts)])
    total_rows = torch.tensor([float(len(batch.audio_ids))])
    dist.all_reduce(total_rows)
    loss_sum = clip_sigmoid_loss(output.clip_embeddings, captions, batch.clip_group, caption_group,
                                 output.clip_scale, output.clip_bias, backend="reference") * len(batch.audio_ids)
    (loss_sum * WORLD_SIZE / total_rows[0]).backward()
    return {name: parameter.grad.clone() if parameter.grad is not None else torch.zeros_like(parameter)
            for name, parameter in model.named_parameters()}


def _averaged(gradients: dict) -> dict:
    """Gradients averaged over ranks, as DDP and DeepSpeed do."""
    for gradient in gradients.values():
        dist.all_reduce(gradient)
        gradient /= WORLD_SIZE
    return gradients


def worker(rank: int, port: int, out_dir: str) -> None:
    """Spawn target: runs every scenario on this rank and saves what it saw to out_dir/rank{rank}.pt."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, (variant, loss_kwargs) in SCENARIOS.items():
            inputs, batch = rank_shares(variant)[rank]
            outcome = run_loss(inputs, batch, loss_kwargs)
            outcome["gradients"] = _averaged(outcome["gradients"])
            results[name] = outcome
        inputs, batch = rank_shares("mixed")[rank]
        results["naive_gather_clip_only"] = {"gradients": _averaged(naive_gather_clip_gradients(inputs, batch))}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
