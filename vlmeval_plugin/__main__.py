"""`python -m vlmeval_plugin ...` is `python run.py ...` (used by hybrid_tools.sweep and torchrun -m)."""

import sys

from vlmeval_plugin.cli import main

sys.exit(main())
