"""ambassadord: one host-wide service ambassador.

How the pieces fit (one feature per module):

* ``cli``: the command line (run / status / iptables / resolve / check): each command
  from its flags (``parser``, which only parses) to frozen settings (``settings``: flags
  weighed against each other and the env, validated before anything starts).
* ``daemon``: ``run``'s life cycle: a start whose every step is undone in reverse order
  (instance guard, listeners, admin socket, iptables rules), signals, sd_notify
  (``sdnotify``), reloads (SIGHUP or a changed ``--config``: validated whole, then
  swapped in) and the container bridges. ``status``: the ``status`` command's table.
* ``config``: route values from ``--map``, a TOML file, ``BACKEND_<PORT>`` and Docker link
  env vars, parsed into frozen ``RouteConfig`` values whose errors name their origin.
* ``sources``: the route sources behind one interface (``RouteSource.read``), and
  ``combine``, which merges what they found (duplicates, scope precedence); the start and
  every reload read routes through it.
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
  (hypercorn + Starlette in the same trio loop; prometheus_client for the exposition),
  loaded only when the admin API is on; ``config_state``: the configuration's loads and
  reloads, which the daemon writes and ``admin`` shows.
* ``relay`` (a package): bytes both ways, half-close aware; in the kernel (a BPF sockmap,
  whose resources one ``KernelRelay`` owns), or recv/send and splice(2). Its docstring
  lists its modules.
* ``connect`` (a package): connect mode's kernel half: cgroup BPF programs (C, compiled
  object committed) that rewrite a consumer's connect() to a backend, and
  ``ConnectPlane``, which owns them on one cgroup. Its docstring lists its modules and API.
* ``dataplane``: what the daemon asks of a data plane (made at start, one task, closed
  at exit), the seam for a second one beside the proxy.
* ``health``: active health checks (a TCP connect per backend every interval) through
  a pure rise/fall state machine; a down backend is not picked.
* ``peers``: what the Server tells the daemon's other processes (no-op by default).
* ``workers`` (a package): ``--workers N``: ``protocol`` (typed messages), ``channel``
  (frames over a socketpair), ``pool`` (the main process's side), ``helper``
  (``python -m ambassadord.workers``), ``count`` (``auto``).
* ``netfilter``: the nat REDIRECT chain (iptables-restore, v4 and v6) and interface
  addresses (pyroute2).
* ``logs``: text or JSON log lines, one per connection; ``Throttled`` for floods.

Resolvers are ``ambassadord.backends`` (one module per source, registered by spec
scheme; ``state`` is the one resolver state machine they all feed). In the source tree
that package is the folder ``backends/`` beside this one (the design card's layout);
installed, it is inside this package (pyproject.toml's package-dir), so the distribution
owns no top-level name but ``ambassadord``.
"""

import importlib.metadata

try:
    # pyproject.toml's version, the one source: `ambassadord --version`, the admin API's
    # /routes and the ambassadord_build_info metric all say the same.
    __version__ = importlib.metadata.version("ambassadord")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def _backends_beside() -> None:
    """Run from a source tree (``python -m ambassadord`` in a checkout, a benchmark's
    ``before@DIR`` variant), ``ambassadord.backends`` is that tree's own ``backends/``:
    loaded here by path, so that an editable install of another checkout, whose finder
    maps the name to *its* folder, never mixes two trees' code. Installed, the package is
    inside this one and this does nothing."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(os.path.dirname(here), "backends", "__init__.py")
    name = f"{__name__}.backends"
    if name in sys.modules or os.path.isdir(os.path.join(here, "backends")) or not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


_backends_beside()
