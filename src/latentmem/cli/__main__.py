"""python -m latentmem.cli (the same as python -m latentmem)."""

import sys

from . import main

sys.exit(main())
