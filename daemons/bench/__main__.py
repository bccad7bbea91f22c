"""python -m daemons.bench: the benchmark (daemons.bench.main)."""

import sys

from daemons.bench.main import main

sys.exit(main())
