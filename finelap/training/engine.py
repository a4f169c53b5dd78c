"""What the DeepSpeed engine is built from: the frozen modules, AdamW over the trainable
parameters, and the DeepSpeed config (schedule, clipping, accumulation, ZeRO, precision)."""
from __future__ import annotations

import torch

from finelap.config import Config, deep_merge


def deepspeed_config(config: Config, total_steps: int, use_bf16: bool) -> dict:
    """The DeepSpeed JSON for this run; `deepspeed.config` entries override ours, nested keys one by
    one (setting zero_optimization.overlap_comm keeps the stage).

    No "optimizer" section: `build_optimizer` makes it (DeepSpeed's own would JIT-compile its
    FusedAdam with nvcc on GPU); the "scheduler" section still drives that optimizer's lr.
    """
    optim = config.optim
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": optim.grad_accumulation,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                # DeepSpeed refuses 0 (a 1-step run, or warmup_steps: 0): one step is no warm-up either
                "warmup_num_steps": max(1, min(optim.warmup_steps, total_steps - 1)),
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # our own log does this
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, config.deepspeed.config)


def freeze(model, config: Config) -> None:
    """Reference options: freeze the audio tower, the text tower and/or the projectors; or train
    only the text tower's top optim.text_encoder_trainable_layers layers."""
    trainable_layers = config.optim.text_encoder_trainable_layers
    if trainable_layers is not None and not config.optim.freeze_text_encoder:
        model.text_encoder.train_top_layers(trainable_layers)
    groups = {
        "freeze_audio_encoder": [model.audio_encoder],
        "freeze_text_encoder": [model.text_encoder],
        "freeze_projectors": [model.clip_projector, model.frame_projector, model.text_projector],
    }
    for option, modules in groups.items():
        if getattr(config.optim, option):
            for module in modules:
                module.requires_grad_(False)


def parameter_groups(model, config: Config) -> list[dict]:
    """Trainable parameters as AdamW groups: the text tower at optim.text_encoder_lr when set.

    The schedule scales each group's own peak lr, so the two keep their ratio throughout.
    """
    text = {id(p) for p in model.text_encoder.parameters()}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    rest = [p for _, p in trainable if id(p) not in text]
    text_params = [p for _, p in trainable if id(p) in text]
    if config.optim.text_encoder_lr is None:
        return [{"params": rest + text_params}]
    groups = [{"params": rest}, {"params": text_params, "lr": config.optim.text_encoder_lr}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, config: Config, on_gpu: bool) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`: what DeepSpeed's "torch_adam" AdamW was (the same numbers on
    CPU), with torch's fused kernel on GPU."""
    optim = config.optim
    return torch.optim.AdamW(parameter_groups(model, config), lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, fused=True if on_gpu else None)
