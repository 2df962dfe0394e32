import sys

from .pool import _helper_main

sys.exit(_helper_main(int(sys.argv[1])))
