"""``--workers N``: N processes accept and relay on the same port; one of them resolves.

Python runs one thread at a time, so one process uses one core for connection set-up (the
part the kernel relay cannot take: accept, SO_ORIGINAL_DST, connect). With ``--workers N``
the daemon is N processes:

* the **main** process is the one started: it reads the configuration, installs the
  iptables rules, runs every route's resolver (one watch per route per host, however many
  workers), serves the admin API, handles signals and reloads, and serves connections
  like any worker;
* N-1 **helper** processes (``python -m ambassadord.workers FD``) only serve connections.

Every process binds the listen addresses with SO_REUSEPORT, so the kernel spreads new
connections over them (by a hash of the addresses and ports). A helper never talks to
Consul, etcd or DNS: the main process sends it the route table and every backend set its
resolvers publish, over a private socketpair. A backend that fails in one process is
ejected in all of them. The admin API asks every helper for its counters when it is read
and shows the sums.

Helpers ignore SIGTERM, SIGINT and SIGHUP: the main process decides (a ``systemctl stop``
or Ctrl-C reaches the whole group, and must not count twice). A helper whose main process
is gone (the socketpair reads EOF) stops like after SIGTERM. A helper that dies is
restarted by the main process, with a backoff.

The modules, each owning one thing:

* protocol.py: the messages (frozen dataclasses) and their frames; no I/O;
* channel.py: frames over one end of the socketpair;
* pool.py: the main process's side (WorkerPool: start, restart, broadcast, collect);
* helper.py: the helper's side (its Server, and what it does with each message);
* count.py: how many processes ``--workers auto`` means.

server.py imports nothing of this package: its Server talks to the pool, or to a helper's
link to the main process, through peers.Peers; the pool reaches the Server only through
the callables it was given. Only helper.py imports server.py (a helper makes its Server).
"""

from .count import default_count
from .pool import WorkerPool, WorkerStartError
from .protocol import Settings

__all__ = ["Settings", "WorkerPool", "WorkerStartError", "default_count"]
