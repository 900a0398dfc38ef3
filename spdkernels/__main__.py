"""``python -m spdkernels ...``: the same command as the ``spdkernels`` console script (generate, demo, train-pdm)."""

import sys

from spdkernels.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
