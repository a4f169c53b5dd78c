"""--probe-embeddings: after training, the last batch's embeddings through the engine, saved to
check an export against."""
from __future__ import annotations

import torch

from finelap.training.hooks import Hook, LastBatch
from finelap.training.runtime import Runtime

EMBEDDING_NAMES = ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings")


class EmbeddingProbe(Hook):
    """At the run's end, embed the last batch through the engine in eval mode (every rank: ZeRO-3
    gathers collectively); rank 0 saves OUTPUT_DIR/probe_embeddings.pt: {"inputs": {features,
    frame_counts, captions, phrases}, and each of EMBEDDING_NAMES}, tensors float32 on the CPU."""

    def __init__(self, engine, runtime: Runtime):
        self.engine, self.runtime = engine, runtime

    def on_finish(self, last: LastBatch | None) -> None:
        rank = self.runtime.rank
        if last is None:
            if rank == 0:
                print("--probe-embeddings: no step ran (the run had already finished), no batch to embed", flush=True)
            return
        features, batch = last.features.to(self.runtime.compute_dtype), last.batch
        self.engine.eval()
        with torch.no_grad():
            output = self.engine(features, last.frame_counts, batch.captions, batch.phrases)
        self.engine.train()
        if rank == 0:
            torch.save({
                "inputs": {"features": features.float().cpu(), "frame_counts": last.frame_counts.cpu(),
                           "captions": list(batch.captions), "phrases": list(batch.phrases)},
                **{name: getattr(output, name).float().cpu() for name in EMBEDDING_NAMES},
            }, self.runtime.output_dir / "probe_embeddings.pt")
