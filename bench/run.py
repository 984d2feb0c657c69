"""The benchmark runner; the same code as `python -m fusedlora bench` (see --help)."""

import sys

from fusedlora.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
