"""Write the README's fault matrix from ``tests/support/faultmatrix.py``.

    python3 scripts/fault_matrix.py          rewrite README.md between the markers
    python3 scripts/fault_matrix.py --check  exit 1 if README.md differs (tests/t4_faults.py)

The table lives between ``<!-- faults:begin -->`` and ``<!-- faults:end -->``; edit the
table in tests/support/faultmatrix.py (the one tests/t4_faults.py asserts), never the
README's copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import REPO, main

sys.path.insert(0, str(REPO / "tests"))
from support.faultmatrix import matrix_markdown

if __name__ == "__main__":
    sys.exit(main("faults", matrix_markdown,
                  "the fault matrix differs from tests/support/faultmatrix.py",
                  "scripts/fault_matrix.py", __doc__.split("\n")[0]))
