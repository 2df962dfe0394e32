"""``--workers N``: see pool.py (split into modules next)."""

from .pool import *  # noqa: F401,F403
from .pool import _cgroup_cpus, _helper_main  # noqa: F401
