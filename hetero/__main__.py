"""``python -m hetero ...``: the same CLI as the ``hetero`` console script."""
import sys

from hetero.app.cli import main

sys.exit(main())
