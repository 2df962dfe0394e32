"""``python -m ambassadord.workers FD``: a helper process (helper.py), started by pool.py."""

import sys

from .helper import main

sys.exit(main(int(sys.argv[1])))
