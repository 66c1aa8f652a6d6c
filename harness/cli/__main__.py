"""`python -m harness.cli ...`, as the benchmarks start the CLI in a child process."""

import sys

from .app import main

sys.exit(main())
