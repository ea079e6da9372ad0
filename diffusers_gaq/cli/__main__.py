"""`python -m diffusers_gaq.cli` (and `accelerate launch -m diffusers_gaq.cli`)."""

import sys

from . import main

sys.exit(main())
