"""The `finelap` command: `finelap SUBCOMMAND [args]`.

Each subcommand lives in its own module, which exposes `main(argv)`; only
the module of the subcommand being run is imported.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "infer": ("finelap.infer", "embeddings, clip and frame scores, and a heatmap for audio files"),
    "synth": ("finelap.synth.cli", "build a synthetic sound-event-detection set (FineLAP-100k style)"),
    "data": ("finelap.data_cli", "validate training metadata and synthesis inputs, pack WebDataset shards"),
    "eval": ("finelap.eval.cli", "retrieval, zero-shot, SED and grounding metrics"),
    "export": ("finelap.export", "a DeepSpeed checkpoint, or a config's untrained model, -> a model folder"),
    "convert": ("finelap.convert", "EAT or reference FineLAP checkpoints -> FineLAP folders"),
    "bench": ("finelap.bench", "run the benchmarks and write their tables"),
}


def _usage() -> str:
    lines = ["usage: finelap SUBCOMMAND [args]", "", "subcommands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"finelap: unknown subcommand '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
