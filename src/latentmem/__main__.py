"""python -m latentmem (also: torchrun -m latentmem train ...)."""

import sys

from .cli import main

sys.exit(main())
