"""`python -m finelap.eval ...`: the same as `finelap eval ...`."""
import sys

from finelap.eval.cli import main

sys.exit(main(sys.argv[1:]))
