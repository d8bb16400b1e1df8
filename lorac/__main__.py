"""python -m lorac ... : the same as the `lorac` console script."""

import sys

from .cli import main

sys.exit(main())
