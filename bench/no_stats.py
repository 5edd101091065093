"""Tollgate with `Stats.observe` as a no-op, for `--targets ...,tollgate-nostats`.

What the live statistics cost on the hot path: the bench runs this next to
`tollgate-memory` (same config, same limited route) and reports the ratio.
Metrics and the access log stay on; only the /api/stats counters are cut.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import stats

stats.Stats.observe = lambda self, record: None  # type: ignore[method-assign]

from proxy.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
