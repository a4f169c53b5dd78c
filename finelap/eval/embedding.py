"""What every task run with a model shares: its context, and embedding the task's audio batch by batch,
keeping what each embedded file scored and reporting the files that could not be embedded."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from finelap.audio.io import AudioLoadError
from finelap.eval.config import EvalTaskConfig
from finelap.eval.readers import BadInputPolicy, EvalDataError


@dataclass
class TaskContext:
    inference: object  # FineLAPInference
    batch_size: int
    out_dir: Path
    heatmaps: int
    scores_dir: Path | None  # where to save score files (None: not saved)


def embedded_batches(
    inference, paths: list[Path], wheres: list[str], batch_size: int, policy: BadInputPolicy, desc: str
):
    """Yield (indices into `paths`, AudioEmbeddings) batch by batch, with a progress bar.

    A batch holding an unreadable file is embedded again file by file, so the
    bad file is reported at its metadata line (an error, or a counted skip).
    """
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        indices = list(range(start, min(start + batch_size, len(paths))))
        try:
            embeddings = inference.embed_audio([paths[i] for i in indices])
        except AudioLoadError:
            for index in indices:
                try:
                    yield [index], inference.embed_audio([paths[index]])
                except AudioLoadError as error:
                    policy.bad(wheres[index], error.reason, str(error))
            continue
        yield indices, embeddings


def embed_and_collect(
    task: EvalTaskConfig, context: TaskContext, paths: list[Path], wheres: list[str], policy: BadInputPolicy,
    score_batch: Callable[[object, list[int]], Iterable],
) -> dict[int, object]:
    """{index into `paths`: what `score_batch` gave for that file}, for the files that could be embedded,
    in the order of `paths`.

    `score_batch(embeddings, indices)` gives one value per index of the batch (`embeddings` are the
    AudioEmbeddings of those files). `wheres` are the files' metadata lines (file:line), where an
    unreadable file is reported. No file embedded at all is an EvalDataError.
    """
    collected: dict[int, object] = {}
    for indices, embeddings in embedded_batches(
        context.inference, paths, wheres, context.batch_size, policy, f"{task.name} audio"
    ):
        collected.update(zip(indices, score_batch(embeddings, indices)))
    if not collected:
        raise EvalDataError(f"{task.metadata}: task '{task.name}': no audio file could be embedded")
    return collected

