"""`python -m xbt_dist.prep <images|text|evalset|zeroshot|validate> ...` (same as `xbt prep ...`)."""

import sys

from xbt_dist.prep.cli import main

sys.exit(main())
