"""The trainer with real DeepSpeed engines: 1 process vs 2 gloo ranks under ZeRO-1/2/3,
exact resume, a rank killed mid-run, half-written checkpoints, export, config errors."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finelap.checkpoint import COMPLETE_MARKER, FINISHED_NAME, latest_complete_tag, tag_for_step
from finelap.training.runtime import SHM_FOLDER
from tests.train_fixtures import (
    REPO, environment, run_training, sample_log, step_log, train_command, write_training_set,
)

STEPS = 3
# 16 clips, global batch 8: two optimizer steps per epoch, so step 3 crosses into epoch 1.
COMMON = ("train.epochs=2", f"train.max_steps={STEPS}", "train.save_every=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="module")
def single_process_run(data, tmp_path_factory):
    """One process, ZeRO-0, the whole global batch of 8 clips."""
    out = tmp_path_factory.mktemp("single")
    run_training(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", *COMMON)
    return out


def _losses(output_dir: Path) -> list[tuple[float, float]]:
    return [(record["clip_loss"], record["frame_loss"]) for record in step_log(output_dir)]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process(data, single_process_run, tmp_path_factory, stage):
    out = tmp_path_factory.mktemp(f"zero{stage}")
    shared_before = set(SHM_FOLDER.glob("deepspeed_allreduce_buffer_*"))
    run_training(data, out, 2, "data.batch_size=4", f"deepspeed.zero_stage={stage}", *COMMON)
    left_behind = set(SHM_FOLDER.glob("deepspeed_allreduce_buffer_*")) - shared_before
    assert not left_behind, f"the run left DeepSpeed's shared-memory buffers in RAM: {sorted(left_behind)}"
    expected, got = _losses(single_process_run), _losses(out)
    assert len(expected) == len(got) == STEPS
    for step, ((clip_1, frame_1), (clip_2, frame_2)) in enumerate(zip(expected, got), start=1):
        assert clip_2 == pytest.approx(clip_1, rel=1e-5), f"ZeRO-{stage} clip loss differs at step {step}"
        assert frame_2 == pytest.approx(frame_1, rel=1e-5), f"ZeRO-{stage} frame loss differs at step {step}"
    # the frame stream really ran: annotated rows and phrase columns in every step
    assert all(record["frame_rows"] > 0 and record["phrase_columns"] > 0 for record in step_log(out))
    # both ranks together saw exactly the single process's samples, step by step
    for step in range(STEPS):
        both = sample_log(out, 0)[step]["samples"] + sample_log(out, 1)[step]["samples"]
        assert sorted(both) == sorted(sample_log(single_process_run, 0)[step]["samples"])


@pytest.mark.distributed
def test_resume_reproduces_the_uninterrupted_run(data, single_process_run, tmp_path):
    """Restart from the step-1 checkpoint: steps 2 and 3 (crossing an epoch) match exactly."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    source = single_process_run / "checkpoints"
    shutil.copytree(source / tag_for_step(1), out / "checkpoints" / tag_for_step(1))
    run_training(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", *COMMON, extra_args=("--resume",))
    resumed = {record["step"]: record for record in step_log(out)}
    original = {record["step"]: record for record in step_log(single_process_run)}
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step]["clip_loss"] == original[step]["clip_loss"]
        assert resumed[step]["frame_loss"] == original[step]["frame_loss"]
        assert resumed[step]["lr"] == original[step]["lr"]
    assert sample_log(out, 0) == sample_log(single_process_run, 0)[1:]


@pytest.mark.distributed
def test_skipped_clips_are_listed_once_checkpointed_and_kept_by_a_resume(tmp_path):
    """Two ranks under data.on_bad_sample: skip, two of 8 clips not audio. Both fall in rank 1's second
    batch of epoch 0, which they leave empty: both ranks skip that step together. Rank 0 meets them in
    epoch 1; skipped.jsonl, written by rank 0, lists each once, clip 6 where rank 1 met it: the skips of
    both ranks were gathered into the checkpoint. A run resumed from it takes the same step and lists the same."""
    data = write_training_set(tmp_path / "tones", clips=8)
    bad = [3, 6]  # a caption-only clip and an annotated one: every phrase label keeps other clips
    for index in bad:
        (tmp_path / "tones" / "audio" / f"clip_{index:03d}.wav").write_text("not audio, a text file named .wav\n")
    overrides = ("data.batch_size=2", "deepspeed.zero_stage=1", "train.epochs=2", "train.save_every=1",
                 "data.on_bad_sample=skip")
    out = tmp_path / "uninterrupted"
    output = run_training(data, out, 2, *overrides, timeout=900).stderr
    # the input's messages reach the console, each led by its rank: one rank converts the metadata, and the
    # skips are reported where they happen
    converting = re.findall(rf"\[rank (\d)\] INFO finelap.data: {re.escape(str(data['metadata']))}: writing its "
                            "metadata cache", output)
    assert len(converting) == 1, output[-3000:]
    assert re.search(r"\[rank 1\] WARNING finelap.data: skipping sample \(audio_unreadable\)", output), output[-3000:]
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    # gathered at the save after step 2: rank 0's own skips first (clip 3, in the batch of step 2), then
    # rank 1's new one (clip 6, from its empty batch); rank 0 meeting clip 6 in step 3 lists it no second time
    assert [(entry["key"], entry["epoch"], entry["batch"]) for entry in listed] == [
        (f"{data['metadata']}:4", 1, 0), (f"{data['metadata']}:7", 0, 1)]
    assert all(entry["reason"] == "audio_unreadable" for entry in listed)
    log = step_log(out)
    assert [record["step"] for record in log] == [1, 2, 3]  # 4 batches a rank, one of them empty on rank 1
    assert (log[-1]["empty_batches"], log[-1]["skipped_audio_unreadable"]) == (1, 2)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / tag_for_step(2), resumed / "checkpoints" / tag_for_step(2))
    run_training(data, resumed, 2, *overrides, extra_args=("--resume",), timeout=900)
    assert (resumed / "skipped.jsonl").read_text() == (out / "skipped.jsonl").read_text()
    (record,) = step_log(resumed)
    assert record["step"] == 3 and record["skipped_audio_unreadable"] == 2
    assert (record["clip_loss"], record["frame_loss"]) == (log[-1]["clip_loss"], log[-1]["frame_loss"])


@pytest.mark.distributed
def test_resume_of_a_finished_run_with_profile_and_probe_takes_no_step(data, single_process_run, tmp_path):
    """Nothing left to train: --profile and --probe-embeddings say so instead of failing on a batch
    that never came, and the run stays finished."""
    out = tmp_path / "finished"
    shutil.copytree(single_process_run, out)
    result = run_training(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", *COMMON,
                          extra_args=("--resume", "--profile", "--probe-embeddings"))
    assert "--profile: no step ran" in result.stdout and "--probe-embeddings: no step ran" in result.stdout
    assert len(step_log(out)) == STEPS and json.loads((out / FINISHED_NAME).read_text()) == {
        "step": STEPS, "total_steps": STEPS, "stopped_by": "max_steps"}


@pytest.mark.distributed
def test_keep_last_removes_older_complete_checkpoints(data, tmp_path):
    run_training(data, tmp_path, 1, "data.batch_size=8", "deepspeed.zero_stage=1", *COMMON, "train.keep_last=2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        tag_for_step(STEPS - 1), tag_for_step(STEPS)]


@pytest.mark.distributed
def test_log_every_and_a_non_finite_loss_found_at_the_next_record(data, tmp_path):
    """train.log_every = 3 writes every third step only; the losses stay on the device in between,
    so a non-finite loss (a NaN logit bias makes every step's loss NaN) is reported at the next
    record with the first step it happened at, and no checkpoint is written after it."""
    out = tmp_path / "log_every"
    run_training(data, out, 1, "data.batch_size=4", "deepspeed.zero_stage=0", "train.epochs=3", "train.max_steps=6",
                 "train.save_every=100", "train.log_every=3")
    assert [record["step"] for record in step_log(out)] == [3, 6]
    wrecked = tmp_path / "wrecked"
    command = train_command(data, wrecked, 1, "data.batch_size=4", "deepspeed.zero_stage=0", "train.epochs=3",
                            "train.max_steps=6", "train.save_every=100", "train.log_every=3", "model.init_bias=.nan")
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FloatingPointError: non-finite loss at step 1 (epoch 0, rank 0, sample indices" in result.stderr + result.stdout
    assert not (wrecked / "train_log.jsonl").read_text().strip()
    # on_nonfinite_loss: skip drops each such batch (here every one: no step is taken) and goes on
    skipped = tmp_path / "skipped"
    run_training(data, skipped, 1, "data.batch_size=4", "deepspeed.zero_stage=0", "train.max_steps=6",
                 "train.save_every=100", "model.init_bias=.nan", "train.on_nonfinite_loss=skip")
    assert json.loads((skipped / FINISHED_NAME).read_text()) == {"step": 0, "total_steps": 4, "stopped_by": "epochs"}
    assert latest_complete_tag(wrecked / "checkpoints") is None


def test_deepspeed_overrides_merge_key_by_key():
    """deepspeed.config entries change the keys they name and keep the trainer's others."""
    from finelap.config import load_config
    from finelap.training.engine import deepspeed_config

    config = load_config(REPO / "configs/train/tiny_cpu.yaml", [
        "deepspeed.config={zero_optimization: {overlap_comm: true}, gradient_clipping: 0.5}"])
    ds = deepspeed_config(config, 10, use_bf16=False)
    assert ds["zero_optimization"] == {"stage": config.deepspeed.zero_stage, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == config.data.batch_size


EAT_STYLE_AUDIO = ("model.audio.block_norm=post", "model.audio.embedding_norm=true", "model.audio.final_norm=false",
                   "model.audio.norm_eps=1.0e-6", "model.audio.position_layout=freq_first",
                   "model.audio.stored_positions=true")


@pytest.mark.distributed
def test_audio_init_from_applies_to_a_fresh_run_only(data, tmp_path):
    """model.audio.init_from loads a converted folder at the start (the frozen tower keeps it through
    training); --resume takes the weights from the checkpoint and never reads init_from again."""
    from safetensors.torch import load_file

    from finelap.config import load_config
    from finelap.checkpoint import ZERO0_MODULE_NAME
    from finelap.models import AudioEncoder
    from finelap.models.eat_weights import save_audio_encoder_folder
    from tests.train_fixtures import CONFIG

    audio_config = load_config(CONFIG, list(EAT_STYLE_AUDIO)).model.audio
    torch.manual_seed(123)
    pretrained = {name: tensor.clone() for name, tensor in AudioEncoder(audio_config).state_dict().items()}
    save_audio_encoder_folder(audio_config, pretrained, tmp_path / "pretrained")
    out = tmp_path / "run"
    common = ("data.batch_size=8", "deepspeed.zero_stage=0", "train.max_steps=2", "train.save_every=1",
              "optim.freeze_audio_encoder=true", *EAT_STYLE_AUDIO)

    def audio_weights(step: int) -> dict:
        module = load_file(out / "checkpoints" / tag_for_step(step) / ZERO0_MODULE_NAME)
        return {name[len("audio_encoder."):]: tensor for name, tensor in module.items() if name.startswith("audio_encoder.")}

    first = run_training(data, out, 1, *common, "train.max_minutes=0.0001",  # stops after step 1
                         f"model.audio.init_from={tmp_path / 'pretrained'}")
    assert f"audio encoder initialised from {tmp_path / 'pretrained'}" in first.stdout
    assert audio_weights(1).keys() == pretrained.keys() and "pos_embed" in pretrained
    for name, tensor in audio_weights(1).items():
        assert torch.equal(tensor, pretrained[name]), name

    resumed = run_training(data, out, 1, *common, f"model.audio.init_from={tmp_path / 'gone'}",
                           extra_args=("--resume",))
    assert "initialised" not in resumed.stdout and [record["step"] for record in step_log(out)] == [1, 2]
    for name, tensor in audio_weights(2).items():
        assert torch.equal(tensor, pretrained[name]), name

    result = subprocess.run(train_command(data, tmp_path / "fresh", 1, *common, f"model.audio.init_from={tmp_path / 'gone'}"),
                            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"model.audio.init_from: not found: {tmp_path / 'gone'}" in result.stderr


@pytest.mark.distributed
def test_periodic_evaluation_logs_metrics_of_a_checkpoint(data, tmp_path):
    out = tmp_path / "with_eval"
    run_training(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", "train.max_steps=2",
                 "train.save_every=100", "train.eval_every=2", f"train.eval_config={data['eval_config']}")
    evaluations = [record for record in step_log(out) if "eval" in record]
    assert [record["step"] for record in evaluations] == [2]
    metrics = evaluations[0]["eval"]["tones"]
    assert 0.0 <= metrics["t2a_R@1"] <= 100.0 and metrics["num_audio"] == 6
    assert (out / "eval" / tag_for_step(2) / "report.md").is_file()
    assert (out / "checkpoints" / tag_for_step(2) / COMPLETE_MARKER).is_file()


@pytest.mark.distributed
def test_time_budget_stops_with_a_complete_checkpoint(data, tmp_path):
    out = tmp_path / "budget"
    run_training(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", "train.max_steps=50", "train.epochs=100",
                 "train.save_every=100", "train.max_minutes=0.0001")
    assert [record["step"] for record in step_log(out)] == [1]
    assert latest_complete_tag(out / "checkpoints") == tag_for_step(1)
    assert json.loads((out / FINISHED_NAME).read_text()) == {"step": 1, "total_steps": 50, "stopped_by": "max_minutes"}


def test_text_tower_gets_its_own_learning_rate():
    from finelap.config import load_config
    from finelap.models import FineLAP
    from finelap.training.engine import freeze, parameter_groups

    config = load_config(REPO / "configs/train/tiny_cpu.yaml", ["optim.text_encoder_lr=1e-6"])
    model = FineLAP(config.model)
    rest, text = parameter_groups(model, config)
    assert "lr" not in rest and text["lr"] == 1e-6
    assert {id(p) for p in text["params"]} == {id(p) for p in model.text_encoder.parameters()}
    assert len(rest["params"]) + len(text["params"]) == len(list(model.parameters()))
    # a frozen text tower leaves one group, without it
    config.optim.freeze_text_encoder = True
    freeze(model, config)
    [only] = parameter_groups(model, config)
    assert len(only["params"]) == len(list(model.parameters())) - len(list(model.text_encoder.parameters()))


def test_text_tower_top_layers_train_alone():
    from finelap.config import ConfigError, load_config
    from finelap.models import FineLAP
    from finelap.train import check_inputs
    from finelap.training.engine import freeze, parameter_groups

    config = load_config(REPO / "configs/train/tiny_cpu.yaml",
                         ["optim.text_encoder_trainable_layers=2", "optim.text_encoder_lr=1e-4"])
    model = FineLAP(config.model)
    freeze(model, config)
    layers = model.text_encoder.layers()
    top = {id(p) for layer in layers[-2:] for p in layer.parameters()}
    for name, parameter in model.text_encoder.named_parameters():
        assert parameter.requires_grad == (id(parameter) in top), name
    rest, text = parameter_groups(model, config)
    assert {id(p) for p in text["params"]} == top and text["lr"] == 1e-4
    # the gradient reaches the top layers and nothing below them
    model.encode_text(["a dog barks", "rising chirp"]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for layer in layers[-2:] for p in layer.parameters()
               if p.dim() == 2)
    assert all(p.grad is None for layer in layers[:-2] for p in layer.parameters())
    assert all(p.grad is None for p in model.text_encoder.model.embeddings.parameters())
    assert all(p.grad is not None for p in model.text_projector.parameters())
    # 0 freezes the tower; more layers than it has, or a negative count, is an error naming the key
    model.text_encoder.train_top_layers(0)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    with pytest.raises(ValueError, match=f"trainable_layers = 7: the text tower has {len(layers)} layers"):
        model.text_encoder.train_top_layers(7)
    config.optim.text_encoder_trainable_layers = -1
    with pytest.raises(ConfigError, match="text_encoder_trainable_layers must be >= 0"):
        check_inputs(config)


def test_latest_complete_tag_ignores_half_written(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / tag_for_step(step)).mkdir()
    for step in (1, 2):
        (tmp_path / tag_for_step(step) / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "not_a_tag").mkdir()
    assert latest_complete_tag(tmp_path) == tag_for_step(2)
    assert latest_complete_tag(tmp_path / "missing") is None


@pytest.mark.distributed
def test_killed_rank_then_resume_covers_the_epoch_once(data, tmp_path):
    """SIGKILL one rank mid-epoch, plant a half-written newer checkpoint, relaunch with --resume:
    every clip of the epoch is trained on exactly once."""
    out = tmp_path / "killed"
    overrides = ("data.batch_size=2", "deepspeed.zero_stage=2", "train.epochs=1", "train.save_every=1")
    launcher = subprocess.Popen(train_command(data, out, 2, *overrides), cwd=REPO, env=environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    try:
        while len(sample_log(out, 1)) < 2:
            assert launcher.poll() is None, f"training ended before it could be killed:\n{launcher.stdout.read()[-4000:]}"
            assert time.time() < deadline, "training made no progress"
            time.sleep(0.1)
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2, f"expected 2 rank processes under the launcher, found {ranks}"
        os.kill(ranks[-1], signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    steps_before = len(sample_log(out, 0))
    assert steps_before < 4, "the run finished before the kill: nothing was tested"

    half_written = out / "checkpoints" / tag_for_step(99)
    half_written.mkdir(parents=True)
    (half_written / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    run_training(data, out, 2, *overrides, extra_args=("--resume",))

    # the last record of each step wins: steps after the checkpoint were redone after the restart
    trained = []
    for rank in (0, 1):
        by_step = {record["step"]: record["samples"] for record in sample_log(out, rank)}
        assert sorted(by_step) == [1, 2, 3, 4]
        trained += [index for samples in by_step.values() for index in samples]
    assert sorted(trained) == list(range(16))
    assert json.loads((out / FINISHED_NAME).read_text()) == {"step": 4, "total_steps": 4, "stopped_by": "epochs"}


def _rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the rank processes the deepspeed launcher started (children of its launch.py child)."""
    children = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(pid))
    ranks, frontier = [], [launcher_pid]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"train.py" in cmdline and b"--local_rank" in cmdline:
                ranks.append(child)
            else:
                frontier.append(child)
    return sorted(ranks)


@pytest.mark.distributed
def test_export_matches_the_trained_engine(data, tmp_path):
    """ZeRO-3 over 2 ranks, then `finelap export`: from_pretrained embeds like the engine did.
    The text tower's top runs twice per step (two length groups) over a cached frozen bottom,
    as in the demo: ZeRO-3 gathers and releases the same layer twice in one forward pass."""
    out = tmp_path / "zero3"
    run_training(data, out, 2, "data.batch_size=4", "deepspeed.zero_stage=3", "train.max_steps=2",
                 "train.save_every=2", "model.text.length_buckets=2", "model.text.cache_frozen=true",
                 "optim.text_encoder_trainable_layers=1", extra_args=("--probe-embeddings",))
    engine_embeddings = torch.load(out / "probe_embeddings.pt", weights_only=True)
    model_dir = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "finelap.cli", "export", "--checkpoint", str(out / "checkpoints"),
                             "--out", str(model_dir)], cwd=REPO, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    from finelap.models import FineLAP

    model = FineLAP.from_pretrained(model_dir)
    inputs = engine_embeddings["inputs"]
    with torch.no_grad():
        output = model(inputs["features"], inputs["frame_counts"], inputs["captions"], inputs["phrases"])
    for name in ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings"):
        torch.testing.assert_close(getattr(output, name), engine_embeddings[name], rtol=1e-5, atol=1e-5)
    # training moved the weights: the exported model is not the initial one
    initial = FineLAP(model.config)
    with torch.no_grad():
        first = initial(inputs["features"], inputs["frame_counts"], inputs["captions"], inputs["phrases"])
    assert not torch.allclose(first.clip_embeddings, output.clip_embeddings, atol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
        ("data.sources=[{name: x, path: does/not/exist.jsonl}]", "metadata file not found: does/not/exist.jsonl"),
        ("train.eval_every=5", "train.eval_config and train.eval_every go together"),
    ],
)
def test_config_errors_stop_before_training(data, tmp_path, override, message):
    command = train_command(data, tmp_path / "bad", 1, override)
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "init_distributed" not in result.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("total_steps,warmup_steps", [(1, 1000), (50, 0), (50, 10)])
def test_schedule_accepts_one_step_runs_and_no_warm_up(total_steps, warmup_steps):
    """DeepSpeed's WarmupCosineLR refuses a warm-up of 0 steps; a 1-step run or warmup_steps: 0
    must still build its schedule."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from finelap.config import load_config
    from finelap.training.engine import deepspeed_config

    config = load_config(REPO / "configs/train/tiny_cpu.yaml", [f"optim.warmup_steps={warmup_steps}"])
    params = deepspeed_config(config, total_steps, use_bf16=False)["scheduler"]["params"]
    assert params["warmup_num_steps"] == max(1, min(warmup_steps, total_steps - 1))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    WarmupCosineLR(optimizer, **params)


def test_run_log_prints_the_time_left_from_the_measured_steps(tmp_path, capsys, monkeypatch):
    from finelap.training import run_log

    clock = [100.0]
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: clock[0])
    log = run_log.RunLog(tmp_path, rank=0, total_steps=40, start_step=0)
    record = {"clip_loss": 1.0, "frame_loss": 0.1, "lr": 1e-3, "samples_per_s": 10.0}
    for step in range(1, 41):
        # the first step pays for start-up; the machine gets busier after step 11
        clock[0] += 20.0 if step == 1 else 1.5 if step <= 11 else 3.0
        log.step({"step": step, **record})
    log.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[0] == ("step 11 of 40: 1.50 s per step (steps 2-11), about 44 s left "
                        f"(done near {lines[0].rsplit('near ', 1)[1]}")
    assert [line.split(":")[0] for line in lines] == [f"step {n} of 40" for n in (11, 12, 16, 20, 24, 28, 32, 36)]
    assert "step 12 of 40: 3.00 s per step (step 12), about 1 min 24 s left" in lines[1]
    assert "step 16 of 40: 3.00 s per step (steps 13-16), about 1 min 12 s left" in lines[2]
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 40

    # train.log_every = 5: a record stands for 5 steps; estimates come at the first record past each threshold
    log = run_log.RunLog(tmp_path, rank=0, total_steps=40, start_step=0)
    for step in range(5, 41, 5):
        clock[0] += 10.0
        log.step({"step": step, **record}, steps=5)
    assert log.bar.n == 40
    log.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" s per step")[0] for line in lines] == [
        f"step {n} of 40: 2.00" for n in (15, 20, 25, 30, 35)]


# ---------------------------------------------------------------- a full disk while saving

def _mount_small_disk(folder: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `folder` (root only); skips the test where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_injected_enospc covers the write")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a real filesystem of that many bytes, unmounted after the test."""
    folder = tmp_path / "small_disk"
    yield lambda size: (_mount_small_disk(folder, size), folder)[1]
    subprocess.run(["umount", str(folder)], capture_output=True)


def _failed_training(data, out, *overrides, wrapper: str | None = None):
    command = train_command(data, out, 1, "data.batch_size=8", "deepspeed.zero_stage=0", *COMMON, *overrides)
    if wrapper is not None:  # run the trainer inside `wrapper`'s set-up (python -c WRAPPER TRAIN.PY ARGS...)
        command = [command[0], "-c", wrapper] + command[1:]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, f"expected the run to stop with exit 1:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stderr


def _tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.distributed
def test_full_disk_before_saving_stops_with_the_newest_checkpoint_and_resumes(data, single_process_run, small_disk,
                                                                               tmp_path):
    """A disk with room for one checkpoint: the check before the second one stops every rank with the
    numbers and the way on; nothing of the second is written, keep_last keeps the first, and --resume
    on a larger disk continues exactly."""
    size = sum(p.stat().st_size for p in (single_process_run / "checkpoints" / tag_for_step(1)).rglob("*"))
    out = small_disk(int(1.5 * size) + 2**21)
    stderr = _failed_training(data, out, "train.keep_last=1")
    checkpoints = out / "checkpoints"
    assert (f"not enough free space to save checkpoint {tag_for_step(2)} in {checkpoints}; nothing was written. "
            f"Free: ") in stderr
    assert f"(the size of the previous checkpoint {tag_for_step(1)})" in stderr
    assert (f"The newest complete checkpoint is {checkpoints / tag_for_step(1)}: make room (or set "
            f"train.keep_last), then continue from it with --resume.") in stderr
    assert "Traceback" not in stderr
    assert _tags(out) == [tag_for_step(1)] and (checkpoints / tag_for_step(1) / COMPLETE_MARKER).is_file()
    larger = tmp_path / "larger_disk"
    shutil.copytree(out, larger)
    run_training(data, larger, 1, "data.batch_size=8", "deepspeed.zero_stage=0", *COMMON, "train.keep_last=1",
                 extra_args=("--resume",))
    # the failed run had logged step 2 before its save; the resumed run wrote it again, and the last record wins
    resumed = {record["step"]: (record["clip_loss"], record["frame_loss"]) for record in step_log(larger)}
    assert list(resumed.values()) == _losses(single_process_run)


@pytest.mark.distributed
def test_disk_filling_during_the_first_save_removes_the_incomplete_folder(data, single_process_run, small_disk):
    """Room for the first checkpoint's lower-bound estimate but not for the checkpoint: the write
    itself fails on a really full filesystem; the message says so and the half-written folder is gone."""
    from types import SimpleNamespace

    from finelap.checkpoint import needed_bytes
    from finelap.config import load_config
    from finelap.models import build_model

    config = load_config(single_process_run / "checkpoints" / "config.yaml")
    model = build_model(config.model, config.train.seed)
    estimate, _ = needed_bytes(SimpleNamespace(module=model), single_process_run / "nothing_here")
    size = sum(p.stat().st_size for p in (single_process_run / "checkpoints" / tag_for_step(1)).rglob("*"))
    assert estimate < 0.9 * size, "the estimate must be a lower bound with room for this test"
    out = small_disk((estimate + size) // 2)
    stderr = _failed_training(data, out)
    checkpoints = out / "checkpoints"
    assert (f"the disk filled while saving checkpoint {tag_for_step(1)} in {checkpoints} (") in stderr
    assert f"the incomplete {checkpoints / tag_for_step(1)} was removed. Free: " in stderr
    assert "(an estimate from the parameter and optimizer bytes). There is no complete checkpoint yet" in stderr
    assert _tags(out) == []


# The trainer with torch.save failing for want of space halfway through the second checkpoint's
# first file, as it does on a full disk: for machines where no small filesystem can be mounted.
ENOSPC_WRAPPER = """
import errno, runpy, sys, torch
real_save = torch.save
def save(obj, path, *args, **kwargs):
    if "step000000002" in str(path):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_save(obj, path, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.distributed
def test_injected_enospc_while_saving(data, tmp_path):
    out = tmp_path / "enospc"
    stderr = _failed_training(data, out, wrapper=ENOSPC_WRAPPER)
    checkpoints = out / "checkpoints"
    assert (f"the disk filled while saving checkpoint {tag_for_step(2)} in {checkpoints} (OSError: [Errno 28] "
            f"No space left on device") in stderr
    assert f"The newest complete checkpoint is {checkpoints / tag_for_step(1)}" in stderr
    assert _tags(out) == [tag_for_step(1)]


# ---------------------------------------------------------------- ZeRO-3 resume

@pytest.mark.distributed
def test_zero3_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    """Two ranks under ZeRO-3 restarted from the step-1 checkpoint: steps 2-4 (crossing an epoch) and
    the weights of every later checkpoint match the uninterrupted run bit for bit. The resumed
    process's first step is step 2, the step in which ZeRO-3 releases even small persistent
    parameters after the forward pass; a scale that lost its gradient there drifted from then on."""
    from finelap.export import consolidated_state_dict

    overrides = ("data.batch_size=4", "deepspeed.zero_stage=3", "train.epochs=2", "train.max_steps=4",
                 "train.save_every=1")
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_training(data, uninterrupted, 2, *overrides)
    shutil.copytree(uninterrupted / "checkpoints" / tag_for_step(1), resumed / "checkpoints" / tag_for_step(1))
    run_training(data, resumed, 2, *overrides, extra_args=("--resume",))
    assert [record["step"] for record in step_log(resumed)] == [2, 3, 4]
    assert _losses(resumed) == _losses(uninterrupted)[1:]
    for step in (2, 3, 4):
        expected = consolidated_state_dict(uninterrupted / "checkpoints", tag_for_step(step))
        got = consolidated_state_dict(resumed / "checkpoints", tag_for_step(step))
        differ = [name for name in expected if not torch.equal(got[name], expected[name])]
        assert not differ, f"after step {step} the resumed run's weights differ: {differ[:8]}"
