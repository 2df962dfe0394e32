# shellcheck shell=bash
# Installs what the tests and the demo need, and does nothing (quietly) when it is there.
# Sourced, not run, by scripts/test and scripts/demo, from the repository root.
#
#   prerequisites_install    runs every step in PREREQUISITE_STEPS, in order
#
# A step is one function, `step_<name>`, named in PREREQUISITE_STEPS. It checks first and
# changes the machine only when something is missing, so a second run costs milliseconds.
# To add one (say Consul, extracted from a Debian bullseye .deb into .cache/), write
# `step_consul` below and append `consul` to the list. A plain Debian package needs no step
# at all: add `package:command` to APT_PACKAGES (e.g. `dnsmasq-base:dnsmasq`).

PREREQUISITE_STEPS=(apt_packages consul venv)

# package:command pairs. A package counts as present when its command is on PATH or dpkg
# says it is installed (iptables lives in /usr/sbin, which a non-root PATH may lack).
APT_PACKAGES=(
  iproute2:ip
  iptables:iptables
  redis-server:redis-server
  redis-tools:redis-cli
  libcap2-bin:setcap
  procps:pkill
  dnsmasq-base:dnsmasq
  etcd-server:etcd
  etcd-client:etcdctl
  docker-compose:docker-compose
  # A real Docker engine for the tests (tests/docker_engine.py): dockerd, containerd, runc,
  # and the docker CLI of the same version (/usr/bin/docker). The tests start their own
  # dockerd inside a network namespace; on a machine whose init starts services, installing
  # docker.io also starts docker.service in the machine's own namespace (Debian's default).
  docker.io:dockerd
  # The base image of the Docker image test (scripts/build-image): a Debian root file system
  # made from the system's apt mirror, imported into the test engine (no registry here).
  debootstrap:debootstrap
  haproxy:haproxy
  nginx-light:nginx
  libnginx-mod-stream:libnginx-mod-stream
  socat:socat
  iperf3:iperf3
  chromium:chromium
  # Real servers and clients through the proxy (tests/test_e2e_protocols.py): PostgreSQL
  # (server, psql, pgbench), OpenSSH's server (its client and curl are on every machine).
  postgresql:pg_ctlcluster
  openssh-server:sshd
  openssh-client:ssh
  curl:curl
  systemd:systemd-analyze
  # connect mode's BPF programs: clang (and llvm's llvm-strip) rebuild
  # ambassadord/connect/connect.bpf.o (the test that the committed object matches its
  # source), libbpf-dev has bpf_helpers.h, bpftool shows what is attached to a cgroup.
  clang:clang
  llvm:llvm-strip
  libbpf-dev:libbpf-dev
  bpftool:bpftool
)

# Consul is not in bookworm; bullseye's package (1.8.7) carries one static binary. It is
# extracted into the project's cache, never installed system-wide. Tests find it here (or
# at $AMBASSADORD_CONSUL).
CONSUL_DIR=.cache/consul
CONSUL_BIN=$CONSUL_DIR/bin/consul

VENV=.venv
VENV_STAMP=$VENV/.ambassadord-install.sha256 # hash of the pyproject.toml and constraints.txt last installed
MIN_PYTHON=(3 11)

# iproute2 and iptables live in sbin directories that a non-root PATH may not include.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac

say() { printf '%s: %s\n' "${PREREQUISITES_WHO:-${0##*/}}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Runs a command as root: directly, or through sudo when we are not root.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root to run '$*' (not root, and sudo is not installed); run this script as root"
  fi
}

apt_install() {
  command -v apt-get >/dev/null \
    || die "missing packages: $*; this is not a Debian-like system (no apt-get): install them by hand"
  say "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq </dev/null >/dev/null
  as_root apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null \
    || die "apt-get install $* failed"
}

package_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Prints "MAJOR MINOR" of a Python interpreter, or fails when it does not run (pyenv shims
# for versions that are installed but not selected exist and fail).
python_version() {
  "$1" -c 'import sys; print(*sys.version_info[:2])' 2>/dev/null
}

python_is_recent() { # MAJOR MINOR
  [ "$1" -gt "${MIN_PYTHON[0]}" ] || { [ "$1" -eq "${MIN_PYTHON[0]}" ] && [ "$2" -ge "${MIN_PYTHON[1]}" ]; }
}

# Prints the path of the newest Python >= 3.11 on PATH (or in /usr/bin); fails if none.
newest_python() {
  local candidate best="" best_key=-1 version key
  for candidate in $(compgen -c python3 | sort -u) /usr/bin/python3*; do
    [[ ${candidate##*/} =~ ^python3(\.[0-9]+)?$ ]] || continue
    version=$(python_version "$candidate") || continue
    # shellcheck disable=SC2086
    python_is_recent $version || continue
    key=$(( ${version% *} * 1000 + ${version#* } ))
    if [ "$key" -gt "$best_key" ]; then
      best=$(command -v "$candidate") best_key=$key
    fi
  done
  [ -n "$best" ] && echo "$best"
}

venv_works() {
  local version
  version=$(python_version "$VENV/bin/python") || return 1
  # shellcheck disable=SC2086
  python_is_recent $version
}

# The Debian packages needed to create the venv, if any: none when a venv already works or
# a Python with ensurepip is there; python3-venv for Debian's own Python without it; python3
# itself when no Python >= 3.11 exists (Debian 12's python3 is 3.11).
python_packages_missing() {
  venv_works && return 0
  local python
  if ! python=$(newest_python); then
    echo python3 python3-venv
  elif ! "$python" -c 'import ensurepip, venv' 2>/dev/null && [[ $python == /usr/bin/* ]]; then
    echo "python3-venv python$(python_version "$python" | tr ' ' .)-venv"
  fi
}

step_apt_packages() {
  local pair missing=()
  for pair in "${APT_PACKAGES[@]}"; do
    command -v "${pair#*:}" >/dev/null || package_installed "${pair%%:*}" || missing+=("${pair%%:*}")
  done
  # shellcheck disable=SC2207
  missing+=($(python_packages_missing))
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

step_venv() {
  if ! venv_works; then
    local python
    python=$(newest_python) || die "no Python >= ${MIN_PYTHON[0]}.${MIN_PYTHON[1]} found"
    "$python" -c 'import ensurepip, venv' 2>/dev/null \
      || die "$python has no venv/ensurepip module: install it, or put a Python >= 3.11 that has it first on PATH"
    say "creating $VENV with $python"
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "$python -m venv $VENV failed"
  fi
  local want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV_STAMP" 2>/dev/null)" != "$want" ] || [ ! -x "$VENV/bin/pytest" ]; then
    say "installing the project and its test dependencies into $VENV (pip install -c constraints.txt -e '.[test]')"
    # python-consul (until 0.2) and py-consul, its continuation, both install the module
    # `consul`: the old one must go first, or removing it later deletes the new one's files.
    if "$VENV/bin/python" -m pip show -q python-consul >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip uninstall -q -y --disable-pip-version-check python-consul >/dev/null 2>&1 || true
    fi
    # pip's build backend is chatty even with -q: keep its output, show it only on failure.
    # constraints.txt: the exact versions (scripts/lock), so a new release changes nothing.
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' \
      </dev/null >"$VENV/pip-install.log" 2>&1; then
      cat "$VENV/pip-install.log" >&2
      die "pip install -c constraints.txt -e '.[test]' failed (log above, also in $VENV/pip-install.log)"
    fi
    echo "$want" >"$VENV_STAMP"
  fi
}

# The Debian mirror the system's own apt sources name (deb822 or one-line format).
debian_mirror() {
  local uri
  uri=$(grep -hoE '^URIs:[[:space:]]*[^[:space:]]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | head -n1)
  [ -n "$uri" ] || uri=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+/debian/?[[:space:]]' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $NF}' | head -n1)
  [ -n "$uri" ] && echo "${uri%/}"
}

step_consul() {
  if [ -x "$CONSUL_BIN" ] && "$CONSUL_BIN" version >/dev/null 2>&1; then
    return 0
  fi
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "Consul for the tests comes from Debian bullseye's package: needs apt-get and dpkg-deb"
  local mirror work keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mirror=$(debian_mirror) || die "cannot find the Debian mirror in /etc/apt/sources.list(.d) to fetch consul from"
  [ -f "$keyring" ] || die "missing $keyring (Debian package debian-archive-keyring)"
  say "fetching consul (Debian bullseye package) from $mirror into $CONSUL_DIR"
  work=$(mktemp -d)
  # A private source list, package lists and cache: the system's apt state is not touched.
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
  echo "deb [signed-by=$keyring] $mirror bullseye main" >"$work/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
              -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
  if ! { apt-get -qq "${opts[@]}" update </dev/null >"$work/log" 2>&1 \
         && (cd "$work" && apt-get -qq "${opts[@]}" download consul </dev/null >>"$work/log" 2>&1) \
         && dpkg-deb -x "$work"/consul_*.deb "$work/x"; }; then
    cat "$work/log" >&2
    rm -rf "$work"
    die "could not fetch consul from Debian bullseye (log above)"
  fi
  mkdir -p "$CONSUL_DIR/bin"
  install -m 0755 "$work/x/usr/bin/consul" "$CONSUL_BIN"
  rm -rf "$work"
  "$CONSUL_BIN" version >/dev/null 2>&1 || die "$CONSUL_BIN does not run"
}

prerequisites_install() {
  [ -f pyproject.toml ] || die "run from the repository root (no pyproject.toml in $PWD)"
  local step
  for step in "${PREREQUISITE_STEPS[@]}"; do
    "step_$step"
  done
}
