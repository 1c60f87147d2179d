#!/usr/bin/env python
"""Report of a trained + compressed model: ``lrpet-dense report`` (see lrpet_dense/cli/report.py)."""
import sys

from lrpet_dense.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
