"""`python -m doai ...` is the `doai` command."""

import sys

from doai.cli import main

sys.exit(main())
