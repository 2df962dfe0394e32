"""ambassadord: one host-wide service ambassador.

How the pieces fit (one feature per module):

* ``cli``: the command line (run / status / iptables / resolve / check); validates
  everything before starting anything; in ``run``, signals, sd_notify (``sdnotify``) and
  reloads (SIGHUP or a changed ``--config``: validated whole, then swapped in).
* ``config``: routes from ``--map``, a TOML file, ``BACKEND_<PORT>`` and Docker link env
  vars, as frozen ``RouteConfig`` values whose errors name their origin.
* ``routes`` and ``balancer``: the pure core. Route lookup by (intended port, source
  address), pick order (priority, random/weighted or round-robin, ejected backends last).
  No sockets, no trio.
* ``original_dst``: ``SO_ORIGINAL_DST`` / ``IP6T_SO_ORIGINAL_DST``, the one platform call
  that tells which port a redirected connection was meant for.
* ``server``: listeners, accept loops, one task per connection (``_handle``: the data
  flow, step by step), graceful shutdown, resolver tasks that keep each route's backend
  set fresh, and ``reload`` (swap the route table; unchanged routes keep their resolver
  and state).
* ``upstream``: the daemon's own sockets toward backends: creation (waiting out a shortage
  of fds), SO_MARK, keepalive, connect with failover and a timeout per attempt, capacity
  vs. backend failure, and the registry of its sockets that the loop guard asks.
* ``stats``: per-route and per-backend counters, plain integers bumped by the connection
  handler; ``admin`` reads them for ``/routes``, ``/metrics`` and the status page
  (hypercorn + Starlette in the same trio loop; prometheus_client for the exposition).
* ``relay`` (a package): bytes both ways, half-close aware; in the kernel (a BPF sockmap,
  whose resources one ``KernelRelay`` owns), or recv/send and splice(2). Its docstring
  lists its modules.
* ``dataplane``: what the daemon asks of a data plane (made at start, one task, closed
  at exit), the seam for a second one beside the proxy.
* ``netfilter``: the nat REDIRECT chain (iptables-restore, v4 and v6) and interface
  addresses (pyroute2).
* ``logs``: text or JSON log lines, one per connection; ``Throttled`` for floods.

Resolvers live in the sibling package ``backends`` (one module per source, registered
by spec scheme).
"""

__version__ = "0.1.0"
