#!/usr/bin/env python
"""Factorise an LRPET-trained detectron2 checkpoint: ``lrpet-dense compress det`` (see lrpet_dense/cli/compress.py)."""
import sys

from lrpet_dense.cli.compress import main_det as main

if __name__ == "__main__":
    sys.exit(main())
