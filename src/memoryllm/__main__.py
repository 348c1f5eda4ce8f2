"""python -m memoryllm (also: torchrun -m memoryllm train ...)."""

import sys

from .cli import main

sys.exit(main())
