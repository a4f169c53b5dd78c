"""Inference with a trained FineLAP model folder: embeddings, clip and frame scores, heatmaps.

API:
    inference = FineLAPInference.from_pretrained("runs/finelap/model")
    audio = inference.embed_audio(["a.wav", "b.wav"])          # AudioEmbeddings
    clip = inference.clip_scores(audio, inference.embed_text(captions))    # [A, C] probabilities
    frames = inference.frame_scores(audio, inference.embed_text(phrases))  # [A, P, T] probabilities

Command line:
    finelap infer --model DIR --audio A.wav [B.wav ...] --captions "..." --phrases "..." --out DIR
writes scores.json and one frame-score heatmap PNG (frame_scores_<stem>.png) per audio file.
scores.json holds "audio" (paths), "captions", "phrases", "frame_hop_seconds",
"clip_scores" ([audio][caption] probabilities) and "frame_scores": per audio file its
"frame_times" (start of each valid frame, seconds), "scores" ([phrase][valid frame]
probabilities) and the "heatmap" file name. Frames past the end of the audio are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from finelap.audio.fbank import compute_features
from finelap.audio.io import AudioLoadError, load_audio
from finelap.config import ConfigError
from finelap.models.finelap import FineLAP, ModelFolderError
from finelap.plots import plot_frame_scores


@dataclass
class AudioEmbeddings:
    """Embeddings of A audio clips, float32 on the CPU, L2-normalised."""

    clip: torch.Tensor  # [A, E] global embedding per clip
    frames: torch.Tensor  # [A, T, E] local embedding per frame
    frame_mask: torch.Tensor  # [A, T] bool, True where the frame starts inside the real audio
    frame_hop_seconds: float  # frame t spans [t * hop, (t + 1) * hop) seconds

    def frame_times(self) -> torch.Tensor:
        """[T] float64 start time of each frame in seconds."""
        return torch.arange(self.frames.shape[1], dtype=torch.float64) * self.frame_hop_seconds


class FineLAPInference:
    """Batched, gradient-free use of a FineLAP model; results come back on the CPU."""

    def __init__(self, model: FineLAP, device: str | torch.device | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        with torch.inference_mode():
            self.clip_scale, self.clip_bias, self.frame_scale, self.frame_bias = (
                float(value) for value in model.logit_parameters()
            )

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device | None = None, batch_size: int = 16
    ) -> FineLAPInference:
        return cls(FineLAP.from_pretrained(model_dir), device=device, batch_size=batch_size)

    @property
    def frame_hop_seconds(self) -> float:
        return self.model.frame_hop_seconds

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """texts -> [N, E] float32, L2-normalised; each distinct text is encoded once."""
        unique = list(dict.fromkeys(texts))
        chunks = [
            self.model.encode_text(unique[start : start + self.batch_size]).float().cpu()
            for start in range(0, len(unique), self.batch_size)
        ]
        if not chunks:
            return torch.empty(0, self.model.embed_dim)
        position = {text: index for index, text in enumerate(unique)}
        return torch.cat(chunks)[[position[text] for text in texts]]

    @torch.inference_mode()
    def embed_audio(self, audio: list[str | Path] | tuple[torch.Tensor, torch.Tensor]) -> AudioEmbeddings:
        """Audio files (read with load_audio, any format/rate/channels, first max_seconds) or a
        (waveforms [B, S] float at the model's sample rate, lengths [B] samples) pair -> AudioEmbeddings."""
        audio_config = self.model.config.audio
        batches = []
        if isinstance(audio, tuple):
            waveforms, lengths = audio
            if waveforms.dim() != 2 or lengths.shape != (waveforms.shape[0],):
                raise ValueError(
                    f"expected waveforms [B, S] and lengths [B], got {tuple(waveforms.shape)} and {tuple(lengths.shape)}"
                )
            for start in range(0, waveforms.shape[0], self.batch_size):
                batches.append((waveforms[start : start + self.batch_size], lengths[start : start + self.batch_size]))
        else:
            paths = list(audio)
            for start in range(0, len(paths), self.batch_size):
                loaded = [
                    load_audio(path, audio_config.sample_rate, audio_config.max_seconds)
                    for path in paths[start : start + self.batch_size]
                ]
                waveforms = torch.nn.utils.rnn.pad_sequence([waveform for waveform, _ in loaded], batch_first=True)
                batches.append((waveforms, torch.tensor([length for _, length in loaded], dtype=torch.int64)))
        clips, frames, masks = [], [], []
        for waveforms, lengths in batches:
            longest = int(lengths.max())
            features, frame_counts = compute_features(
                waveforms[:, :longest].to(self.device, torch.float32), lengths.to(self.device), audio_config
            )
            clip, frame, mask = self.model.encode_audio(features, frame_counts)
            clips.append(clip.float().cpu())
            frames.append(frame.float().cpu())
            masks.append(mask.cpu())
        if not batches:
            width, num_frames = self.model.embed_dim, self.model.audio_encoder.num_frames
            return AudioEmbeddings(
                torch.empty(0, width), torch.empty(0, num_frames, width),
                torch.empty(0, num_frames, dtype=torch.bool), self.frame_hop_seconds,
            )
        return AudioEmbeddings(torch.cat(clips), torch.cat(frames), torch.cat(masks), self.frame_hop_seconds)

    @torch.inference_mode()
    def clip_similarity(self, audio_emb: AudioEmbeddings, text_emb: torch.Tensor) -> torch.Tensor:
        """[A, C] cosine similarity of clip and text embeddings (for ranking)."""
        return audio_emb.clip @ text_emb.to(audio_emb.clip).T

    @torch.inference_mode()
    def clip_scores(self, audio_emb: AudioEmbeddings, text_emb: torch.Tensor) -> torch.Tensor:
        """[A, C] probabilities sigmoid(clip_scale * cos + clip_bias) that caption c describes clip a."""
        return torch.sigmoid(self.clip_scale * self.clip_similarity(audio_emb, text_emb) + self.clip_bias)

    @torch.inference_mode()
    def frame_scores(self, audio_emb: AudioEmbeddings, phrase_emb: torch.Tensor) -> torch.Tensor:
        """[A, P, T] probabilities sigmoid(frame_scale * cos + frame_bias) that phrase p sounds in frame t.

        Every frame is scored; audio_emb.frame_mask tells which frames lie inside the real audio.
        """
        cosine = torch.einsum("ate,pe->apt", audio_emb.frames, phrase_emb.to(audio_emb.frames))
        return torch.sigmoid(self.frame_scale * cosine + self.frame_bias)


def _heatmap_names(paths: list[Path]) -> list[str]:
    """frame_scores_<stem>.png per audio file; files sharing a stem get their position appended."""
    counts = Counter(path.stem for path in paths)
    return [
        f"frame_scores_{path.stem}.png" if counts[path.stem] == 1 else f"frame_scores_{path.stem}_{index}.png"
        for index, path in enumerate(paths)
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap infer",
        description="Score audio files against captions (clip level) and phrases (frame level).",
    )
    parser.add_argument("--model", required=True, type=Path, help="model folder written by FineLAP.save_pretrained")
    parser.add_argument("--audio", required=True, nargs="+", type=Path, help="audio files")
    parser.add_argument("--captions", nargs="*", default=[], help="texts scored against whole clips")
    parser.add_argument("--phrases", nargs="*", default=[], help="sound-event phrases scored per frame")
    parser.add_argument("--out", required=True, type=Path, help="folder for scores.json and the heatmap PNGs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=16, help="clips or texts per forward pass")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.captions and not args.phrases:
        parser.error("give at least one text with --captions or --phrases")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        inference = FineLAPInference.from_pretrained(args.model, device=args.device, batch_size=args.batch_size)
        audio = inference.embed_audio(args.audio)
    except (AudioLoadError, ModelFolderError, ConfigError) as error:
        print(f"finelap infer: error: {error}", file=sys.stderr)
        return 1
    clip_scores = inference.clip_scores(audio, inference.embed_text(args.captions))
    frame_scores = inference.frame_scores(audio, inference.embed_text(args.phrases))
    hop = audio.frame_hop_seconds

    args.out.mkdir(parents=True, exist_ok=True)
    heatmap_names = _heatmap_names(args.audio)
    per_audio = []
    for index, path in enumerate(args.audio):
        valid = int(audio.frame_mask[index].sum())  # valid frames form a prefix
        scores = frame_scores[index, :, :valid]
        entry = {
            "audio": str(path),
            "frame_times": [round(t * hop, 6) for t in range(valid)],
            "scores": scores.tolist(),
        }
        if args.phrases:
            plot_frame_scores(scores, args.phrases, hop, args.out / heatmap_names[index], title=path.name)
            entry["heatmap"] = heatmap_names[index]
        per_audio.append(entry)
    report = {
        "model": str(args.model),
        "frame_hop_seconds": hop,
        "audio": [str(path) for path in args.audio],
        "captions": args.captions,
        "phrases": args.phrases,
        "clip_scores": clip_scores.tolist(),
        "frame_scores": per_audio,
    }
    scores_path = args.out / "scores.json"
    scores_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {scores_path}" + (f" and {len(per_audio)} heatmap(s)" if args.phrases else ""))
    return 0
