"""``python -m devices run|bench EXPORT_DIR ...``: the torch-free standalone runner (see devices.standalone)."""
from __future__ import annotations

import sys
from typing import Sequence

from devices.standalone import main as _main


def main(argv: Sequence[str] | None = None, prog: str = "python -m devices") -> int:
    return _main(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
