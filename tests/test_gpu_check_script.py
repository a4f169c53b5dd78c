"""benchmarks/gpu_check.sh, the one script a lent GPU machine runs, can fail: its exit status is 1
when a step failed (the summary says which), and 0 when every step passed. Run here with its
environment step alone (STEPS=""), which needs no GPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _check(tmp_path, **environment) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env.update(OUT=str(tmp_path / "out"), STEPS="", **environment)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failing_step_makes_the_check_fail(tmp_path):
    result = _check(tmp_path, PYTHON="false")  # a Python that fails whatever it runs
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gpu_check FAILED: environment (exit 1), summary (exit 1)" in result.stderr


def test_passing_steps_pass_and_the_summary_lists_them(tmp_path):
    result = _check(tmp_path, PYTHON=sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"python: {sys.executable}" in result.stdout
    assert "GPU check summary" in result.stdout and "FAILED" not in result.stdout + result.stderr
    summary = result.stdout[result.stdout.index("GPU check summary"):]
    assert any(line.split()[:2] == ["environment", "ok"] for line in summary.splitlines())


def test_the_smoke_run_takes_the_checkouts_virtual_environment(tmp_path):
    venv_python = REPO / ".venv" / "bin" / "python"
    result = _check(tmp_path)
    expected = str(venv_python) if venv_python.exists() else "python3"
    first = result.stdout.splitlines()[0]
    assert first.startswith("python: ") and first.endswith(expected), first
