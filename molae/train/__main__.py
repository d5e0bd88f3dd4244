"""`python -m molae.train` (and torchrun -m molae.train): the trainer's command line."""

import sys

from .cli import main

sys.exit(main())
