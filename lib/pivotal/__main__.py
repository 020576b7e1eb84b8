"""``python -m pivotal`` runs the command-line interface."""

import sys

from pivotal.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
