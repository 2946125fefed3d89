#!/usr/bin/env bash
# Build the fedmq container images with podman on a machine that reaches no image registry
# but does reach a Debian mirror and a Python package index:
#   - the base image is Debian 12 made by debootstrap from the host's apt mirror, imported
#     as localhost/debian:bookworm (the Dockerfiles install python3 from its apt);
#   - the wheels of fedmq[EXTRA] are downloaded on the host, with the host's pip and its
#     configuration, and installed offline in the build (mounted at /wheels).
#
#   deploy/docker/build-offline.sh aggregator [TAG]   # default TAG localhost/fedmq-aggregator:0.1.0
#   deploy/docker/build-offline.sh agent [TAG]        # default TAG localhost/fedmq-agent:0.1.0
#   deploy/docker/build-offline.sh mosquitto [TAG]    # default TAG localhost/fedmq-mosquitto:2
#   deploy/docker/build-offline.sh base               # only the base image
#
# Cached under FEDMQ_CONTAINER_CACHE (default: .cache/containers in the repository):
#   debian-bookworm.tar      the base root file system (imported again if the image is gone)
#   wheels/EXTRA-HASH/       the wheels for this pyproject.toml, Python and machine
# Environment:
#   PYTHON         the Python whose pip downloads the wheels (default python3; must be 3.11,
#                  the python3 of Debian 12 in the image)
#   DEBIAN_MIRROR  default: the first bookworm mirror in /etc/apt/sources.list*
#   BASE_IMAGE     default localhost/debian:bookworm
#   PODMAN_ARGS    global podman flags, default "--runtime /usr/sbin/runc
#                  --cgroup-manager=cgroupfs" (crun and systemd cgroups fail on some hosts)
# Needs root (debootstrap), podman, runc and debootstrap (apt-get install podman runc
# debootstrap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${FEDMQ_CONTAINER_CACHE:-$ROOT/.cache/containers}
PYTHON=${PYTHON:-python3}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
read -r -a PODMAN_FLAGS <<<"${PODMAN_ARGS:---runtime /usr/sbin/runc --cgroup-manager=cgroupfs}"
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

say() { printf 'build-offline: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
pm() { podman "${PODMAN_FLAGS[@]}" "$@"; }

# The first "deb" mirror of bookworm in the host's apt sources (one-line and deb822 files).
apt_mirror() {
  local files=()
  shopt -s nullglob
  [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  files+=(/etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  shopt -u nullglob
  ((${#files[@]})) || return 0
  awk '
    function flush() {
      if (!found && (" " types " ") ~ / deb / && (" " suites " ") ~ / bookworm /) {
        split(uris, u, " "); if (u[1] != "") { print u[1]; found = 1 }
      }
      types = ""; uris = ""; suites = ""
    }
    FNR == 1 { flush() }
    /^[[:space:]]*#/ { next }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[[:space:]]*$/) { flush(); next }
      key = tolower($1); value = $0; sub(/^[^:]*:[[:space:]]*/, "", value)
      if (key == "types:") types = value
      else if (key == "uris:") uris = value
      else if (key == "suites:") suites = value
      next
    }
    $1 == "deb" && !found {
      line = $0; gsub(/\[[^]]*\]/, "", line); split(line, f, " ")
      if (f[3] == "bookworm") { print f[2]; found = 1 }
    }
    END { flush() }
  ' "${files[@]}"
}

ensure_base() {
  if pm image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE: present"
    return
  fi
  local tar=$CACHE/debian-bookworm.tar
  if [[ ! -f $tar ]]; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
    [[ -n $mirror ]] || die "no bookworm mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"
    local dir=$CACHE/rootfs.$$
    say "debootstrap --variant=minbase bookworm from $mirror"
    rm -rf "$dir"
    debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $CACHE/debootstrap.log"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -cf "$tar.$$" .
    mv -f "$tar.$$" "$tar"
    rm -rf "$dir"
  fi
  say "importing $tar as $BASE_IMAGE"
  pm import --quiet "$tar" "$BASE_IMAGE" >/dev/null
}

# The wheels of fedmq[$1] and of its build backend, for this pyproject.toml; prints the dir.
ensure_wheels() {
  local extra=$1 version key dir
  version=$("$PYTHON" -c 'import platform, sys; print("%d.%d-%s" % (*sys.version_info[:2], platform.machine()))')
  [[ $version == 3.11-* ]] || die "$PYTHON is Python $version: the image's python3 is 3.11, set PYTHON"
  # The host's pip evaluates environment markers for the host's Python (e.g. 3.11.7), the
  # image installs with Debian 12's (3.11.2): wheels that only Pythons before 3.11.3 need
  # are listed here (redis requires async-timeout there).
  local image_only=("async-timeout>=4.0.3")
  key=$( { cat "$ROOT/pyproject.toml"; echo "$extra $version ${image_only[*]}"; } | sha256sum | cut -c1-16)
  dir=$CACHE/wheels/$extra-$key
  if [[ ! -d $dir ]]; then
    say "downloading the wheels of fedmq[$extra] with $PYTHON -m pip"
    rm -rf "$dir.$$"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$dir.$$" \
      "${ROOT}[${extra}]" "setuptools>=77" wheel "${image_only[@]}" >&2
    mv -T "$dir.$$" "$dir"
  fi
  printf '%s\n' "$dir"
}

build() {
  local dockerfile=$1 extra=$2 tag=$3 wheels
  ensure_base
  wheels=$(ensure_wheels "$extra")
  say "building $tag from $dockerfile on $BASE_IMAGE"
  pm build --format docker --network host "${ULIMITS[@]}" \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_INSTALL_ARGS="--no-index --find-links /wheels" \
    --volume "$wheels:/wheels:ro" \
    -f "$dockerfile" -t "$tag" "$ROOT"
}

# Mosquitto from the base's apt, laid out like eclipse-mosquitto:2 (compose.podman.yaml).
build_mosquitto() {
  local tag=$1
  ensure_base
  say "building $tag from deploy/docker/Dockerfile.mosquitto on $BASE_IMAGE"
  pm build --format docker --network host "${ULIMITS[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -f "$ROOT/deploy/docker/Dockerfile.mosquitto" -t "$tag" "$ROOT/deploy/docker"
}

main() {
  [[ $# -ge 1 ]] || die "usage: $0 aggregator|agent|mosquitto|base [TAG]"
  command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
  mkdir -p "$CACHE"
  # One build at a time per cache (several checkouts may share it).
  exec 9>"$CACHE/.lock"
  flock 9
  case $1 in
    base) ensure_base ;;
    aggregator) build "$ROOT/deploy/docker/Dockerfile" aggregator \
      "${2:-localhost/fedmq-aggregator:0.1.0}" ;;
    agent) build "$ROOT/deploy/docker/Dockerfile.agent" edge \
      "${2:-localhost/fedmq-agent:0.1.0}" ;;
    mosquitto) build_mosquitto "${2:-localhost/fedmq-mosquitto:2}" ;;
    *) die "unknown target ${1@Q}: aggregator, agent, mosquitto or base" ;;
  esac
}

main "$@"
