"""The zero-shot task: each clip's labels ranked by its score with every class prompt; accuracy (one
label per clip) or mAP (several)."""
from __future__ import annotations

import numpy as np

from finelap.eval.config import DEFAULT_PROMPTS, EvalTaskConfig, prompt_for
from finelap.eval.embedding import TaskContext, embed_and_collect
from finelap.eval.readers import BadInputPolicy, read_classes, read_labels
from finelap.eval.report import TaskReport, skip_notes
from finelap.metrics.classification import accuracy, mean_average_precision


def run_zero_shot(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    classes = read_classes(task.classes) if task.classes else None
    clips = read_labels(task.metadata, task.audio_root, policy, classes, task.filename_column, task.label_column)
    if classes is None:
        classes = sorted({label for clip in clips for label in clip.labels})
    template = task.prompt_template or DEFAULT_PROMPTS["zero_shot"]
    text = context.inference.embed_text([prompt_for(label, template) for label in classes])
    rows = embed_and_collect(  # clip index -> [K] score of every class
        task, context, [clip.audio_path for clip in clips], [clip.where for clip in clips], policy,
        lambda embeddings, _: context.inference.clip_scores(embeddings, text).double().numpy(),
    )
    kept = list(rows)
    scores = np.stack([rows[index] for index in kept])  # [N, K]
    class_index = {label: k for k, label in enumerate(classes)}
    multi_label = any(len(clips[index].labels) != 1 for index in kept)
    metrics: dict[str, float] = {}
    if multi_label:
        targets = np.zeros_like(scores, dtype=np.int64)
        for row, index in enumerate(kept):
            targets[row, [class_index[label] for label in clips[index].labels]] = 1
        metrics["mAP"] = mean_average_precision(scores, targets)
    else:
        metrics["accuracy"] = accuracy(scores, np.array([class_index[clips[index].labels[0]] for index in kept]))
    metrics.update(num_clips=len(kept), num_classes=len(classes))
    inputs = {"metadata": task.metadata, "prompt": template}
    return TaskReport(task.name, task.type, metrics, inputs=inputs, notes=skip_notes(policy))
