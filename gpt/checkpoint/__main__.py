"""`python -m gpt.checkpoint consolidate RUN`: see consolidation.py."""

import sys

from gpt.checkpoint.consolidation import main

sys.exit(main())
