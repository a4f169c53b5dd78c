"""The retrieval task: text-to-audio and audio-to-text recall, mAP@10 and median rank of every caption."""
from __future__ import annotations

import numpy as np

from finelap.eval.config import EvalTaskConfig
from finelap.eval.embedding import TaskContext, embed_and_collect
from finelap.eval.readers import BadInputPolicy, read_retrieval
from finelap.eval.report import TaskReport, plot_rank_histogram, skip_notes
from finelap.metrics.retrieval import retrieval_metrics


def run_retrieval(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    items = read_retrieval(task.metadata, task.audio_root, policy)
    captions = [caption for item in items for caption in item.captions]
    caption_item = np.array([index for index, item in enumerate(items) for _ in item.captions])
    text = context.inference.embed_text(captions)
    rows = embed_and_collect(  # item index -> [C] similarity to every caption
        task, context, [item.audio_path for item in items], [item.where for item in items], policy,
        lambda embeddings, _: context.inference.clip_similarity(embeddings, text).double().numpy(),
    )
    kept = list(rows)  # items whose audio could be embedded
    row_of = {item_index: row for row, item_index in enumerate(kept)}
    caption_kept = np.isin(caption_item, kept)
    similarity = np.stack([rows[index] for index in kept])[:, caption_kept]
    result = retrieval_metrics(similarity, np.array([row_of[i] for i in caption_item[caption_kept]]))
    metrics = {**result.metrics, "num_audio": len(kept), "num_captions": int(caption_kept.sum())}
    plot = plot_rank_histogram(
        result.text_to_audio_ranks, context.out_dir / f"{task.name}_t2a_ranks.png", f"{task.name}: text-to-audio ranks"
    )
    return TaskReport(task.name, task.type, metrics, inputs={"metadata": task.metadata}, plots=[plot],
                      notes=skip_notes(policy))
