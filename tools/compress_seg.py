#!/usr/bin/env python
"""Factorise an LRPET-trained mmseg checkpoint: ``lrpet-dense compress seg`` (see lrpet_dense/cli/compress.py)."""
import sys

from lrpet_dense.cli.compress import main_seg as main

if __name__ == "__main__":
    sys.exit(main())
