"""``python -m scbert_tl`` (e.g. under ``torchrun``) runs the ``scbert`` command."""

import sys

from ._cli import main

sys.exit(main())
