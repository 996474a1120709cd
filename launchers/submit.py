"""`python launchers/submit.py ...`: the same as `xbt submit ...` (the logic is `xbt_dist.submit`).

Kept so the commands in docs/launching.md and scripts that import `submit` from this directory
keep working; see xbt_dist/submit.py for the options and the Python API.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import xbt_dist  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a bare checkout: the package sits beside this directory
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xbt_dist.submit import (PIPELINE, RESUMABLE, StageJob, dry_run, launcher_dir,  # noqa: E402,F401
                             main, make_executor, submit_pipeline, submit_stage)

if __name__ == "__main__":
    sys.exit(main())
