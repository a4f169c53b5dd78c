"""The `finelap` command: subcommand dispatch and `finelap bench`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finelap import bench, cli

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in printed


def test_unknown_subcommand_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


def test_every_subcommand_module_has_main():
    import importlib

    for module_name, _ in cli.SUBCOMMANDS.values():
        assert callable(importlib.import_module(module_name).main), module_name


def test_python_m_finelap_eval_runs_finelap_eval():
    result = subprocess.run([sys.executable, "-m", "finelap.eval", "sed", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: finelap eval sed")


def test_bench_runs_a_benchmark_and_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finelap.cli", "bench", "dedup", "--", "--out", str(tmp_path),
                             "--clusters", "40"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [table] = tmp_path.glob("train_step_dedup_*.json")
    rows = json.loads(table.read_text())["rows"]
    # de-duplication never encodes more tokens than encoding every occurrence padded to 30
    assert all(row["tokens_dedup"] < row["tokens_reference"] for row in rows)
    assert (tmp_path / table.name.replace(".json", ".md")).is_file()


def test_bench_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["nope"])
    assert exit.value.code == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("module_name", ["finelap.train", "finelap.export", "finelap.eval.cli", "finelap.demo"])
def test_set_takes_several_pairs_and_repeats(module_name):
    """`--set a=1 b=2` and `--set a=1 --set b=2` (and both mixed) give every pair, in order, on every
    command that has --set."""
    import importlib

    module = importlib.import_module(module_name)
    parsers = {
        "finelap.train": lambda argv: module.parse_args(["--config", "c.yaml", *argv]),
        "finelap.export": lambda argv: module.build_parser().parse_args(["--out", "m", *argv]),
        "finelap.eval.cli": lambda argv: module.model_parser().parse_args(["--model", "m", "--config", "c", *argv]),
        "finelap.demo": lambda argv: module.build_parser().parse_args(argv),
    }
    parse = parsers[module_name]
    dest = "overrides" if module_name == "finelap.eval.cli" else "set"
    pairs = ["optim.lr=1e-4", "train.max_steps=7", "data.batch_size=2"]
    assert getattr(parse(["--set", *pairs]), dest) == pairs
    assert getattr(parse([item for pair in pairs for item in ("--set", pair)]), dest) == pairs
    assert getattr(parse(["--set", *pairs[:2], "--set", pairs[2]]), dest) == pairs
    assert getattr(parse([]), dest) == []
