"""``python -m lrpet_dense`` is ``lrpet-dense``."""
import sys

from lrpet_dense.cli import main

sys.exit(main())
