"""The eval config: which tasks `finelap eval --model` runs, on which files.

Config (YAML, keys checked by finelap.config; relative paths are relative
to the working directory, or to `root`):

    root: null              # null: the working directory; else a folder, relative to the config file's
    batch_size: 16          # clips / texts per forward pass
    device: null            # null: cuda when available
    heatmaps: 3             # frame-score heatmaps drawn per SED / grounding task
    tasks:
      - name: audiocaps
        type: retrieval     # retrieval | zero_shot | sed | grounding
        metadata: data/audiocaps/test.jsonl
        audio_root: null    # relative audio paths: default the metadata file's folder
Every task key is listed, with its default, in `EvalTaskConfig`; examples: configs/eval/*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from finelap.config import ConfigError, load_config

DEFAULT_PROMPTS = {"zero_shot": "The sound of {label}", "sed": "{label}"}


@dataclass
class EvalTaskConfig:
    """One evaluation task on one dataset."""

    name: str  # names the task in metrics.json, the report and plot files
    type: Literal["retrieval", "zero_shot", "sed", "grounding"]
    metadata: str  # retrieval JSONL | zero-shot CSV/JSONL labels | SED ground-truth TSV | grounding JSON(L)
    audio_root: str | None = None  # relative audio paths resolve here (default: the metadata file's folder)
    classes: str | None = None  # zero_shot / sed: class list file, one label per line (default: labels present)
    filename_column: str = "filename"  # zero_shot CSV: column of audio paths (relative to audio_root)
    label_column: str = "label"  # zero_shot CSV: column of labels ("category" in ESC-50's esc50.csv)
    durations: str | None = None  # sed (required) / grounding (default: read from the audio files)
    # text embedded per class, "{label}" replaced; default "The sound of {label}" (zero_shot), "{label}" (sed)
    prompt_template: str | None = None
    median_filter: int = 3  # frames; sed: on scores before metrics, grounding: on decisions in threshold_auc; 1 = off
    psds_alpha_st: float = 1.0  # sed: PSDS penalty on class instability (the reference uses 0 for AudioSet-strong)
    batch_size: int | None = None  # default: the run's batch_size
    num_jobs: int = 1  # processes sed_scores_eval may use
    on_bad_sample: Literal["error", "skip"] = "error"


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    # relative task paths resolve against this folder, itself relative to the config file's folder
    # ("." for a config kept beside its data, as `finelap synth` writes); null: the working directory
    root: str | None = None
    batch_size: int = 16
    device: str | None = None
    heatmaps: int = 3


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    """Read and check an eval config (unknown keys and bad values are ConfigErrors naming key and file)."""
    config = load_config(path, overrides, section=EvalConfig)
    if not config.tasks:
        raise ConfigError(f"{path}: key 'tasks' lists no task")
    if config.root is not None:
        root = Path(path).resolve().parent / config.root  # an absolute root stays as it is
        for task in config.tasks:
            for key in ("metadata", "audio_root", "classes", "durations"):
                if getattr(task, key) is not None:
                    setattr(task, key, str(root / getattr(task, key)))
    names = [task.name for task in config.tasks]
    for index, task in enumerate(config.tasks):
        if names.count(task.name) > 1:
            raise ConfigError(f"{path}: key 'tasks[{index}].name' = {task.name!r} is used by more than one task")
        if task.type == "sed" and task.durations is None:
            raise ConfigError(f"{path}: key 'tasks[{index}].durations' is required for a sed task")
        if task.median_filter < 1:
            raise ConfigError(f"{path}: key 'tasks[{index}].median_filter' must be at least 1")
        template = task.prompt_template
        if template is not None:
            try:
                usable = "{label}" in template and template.format(label="x") is not None
            except (KeyError, IndexError, ValueError):
                usable = False
            if not usable:
                raise ConfigError(
                    f"{path}: key 'tasks[{index}].prompt_template' = {template!r} must use '{{label}}' "
                    "as its only placeholder"
                )
    if config.batch_size < 1:
        raise ConfigError(f"{path}: key 'batch_size' must be at least 1")
    return config


def prompt_for(label: str, template: str) -> str:
    """The text embedded for a class label: underscores read as spaces ("dog_bark" -> "dog bark")."""
    return template.format(label=label.replace("_", " "))
