"""The errors of the synthesis pipeline (an index or bank file that cannot be read at all raises
finelap.bad_input.MetadataError or FileNotFoundError)."""
from finelap.bad_input import Problem, format_problems


class SynthError(ValueError):
    """The synthesis cannot go on: bad settings, no usable source, an output folder made with other settings."""


class InputProblems(SynthError):
    """Problems found in the inputs (index and phrase bank lines, source audio), all of them, before any
    mixture is made; the message lists every one, grouped by kind."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(
            f"{len(problems)} problem(s) in the synthesis inputs, nothing was made; fix them, or leave these lines "
            "and clips out with --on-bad-sample skip (each is then counted in report.json):\n"
            + format_problems(problems)
        )
        self.problems = problems
