"""`python -m gpt.checkpoint list|consolidate RUN`: see commands.py."""

import sys

from gpt.checkpoint.commands import main

sys.exit(main())
