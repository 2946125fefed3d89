#!/usr/bin/env bash
# Install or upgrade the fedmq edge agent as a systemd service on Raspberry Pi OS / Debian.
#
#   sudo deploy/install-agent.sh --source dist/fedmq-0.1.0-py3-none-any.whl
#   sudo deploy/install-agent.sh --source /home/pi/fedmq            # a git checkout
#   sudo deploy/install-agent.sh --source 'fedmq==0.1.0' --enable   # from the package index
#
# Idempotent: re-running upgrades the venv and the unit, keeps the user, agent.toml and
# agent.env. Nothing is started unless --enable is given. Run with --help for the options.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UNIT_NAME=fedmq-agent.service
readonly DEFAULT_VENV=/opt/fedmq/venv
readonly DEFAULT_CONFIG_DIR=/etc/fedmq
readonly STATE_DIR=/var/lib/fedmq-agent

SOURCE=fedmq
EXTRAS=edge
PREFIX=""
VENV=""
CONFIG_DIR=""
UNIT_DIR=""
PYTHON=python3
PIP_ARGS=""
SYSTEM_SITE_PACKAGES=0
CREATE_USER=1
USE_SYSTEMD=1
ENABLE=0
DRY_RUN=0
SERVICE_USER=fedmq

usage() {
    cat <<EOF
Usage: ${0##*/} [OPTIONS]

Install the fedmq edge agent: a system user, a virtual environment with fedmq[edge]
(LiteRT, paho-mqtt, msgpack, numpy, cryptography; no TensorFlow), the systemd unit
${UNIT_NAME} and example configuration. Starts nothing unless --enable.

Source of fedmq:
  --source SRC        a wheel or sdist file, a source checkout (directory with
                      pyproject.toml), or a requirement such as 'fedmq==0.1.0'
                      (default: ${SOURCE})
  --extras LIST       extras to install (default: ${EXTRAS})
  --python PATH       Python >= 3.11 that creates the venv (default: ${PYTHON})
  --pip-args ARGS     extra arguments for pip install, split on spaces
                      (e.g. '--no-deps', '--index-url URL', '--no-index --find-links DIR')
  --system-site-packages
                      let the venv see the system's packages (e.g. apt's python3-numpy)

Locations:
  --prefix DIR        install under DIR instead of / (venv DIR${DEFAULT_VENV}, config
                      DIR${DEFAULT_CONFIG_DIR}, unit DIR/etc/systemd/system); the unit is
                      rewritten to match
  --venv DIR          the virtual environment (default: PREFIX${DEFAULT_VENV})
  --config-dir DIR    configuration directory (default: PREFIX${DEFAULT_CONFIG_DIR})
  --unit-dir DIR      where the unit file goes (default: PREFIX/etc/systemd/system)
  --user NAME         service user (default: ${SERVICE_USER})

Behaviour:
  --enable            enable and start (or restart) the service once installed
  --no-user           do not create the service user or chown files
  --no-systemd        do not run systemctl (the unit file is still written)
  --dry-run           print what would be done, change nothing
  -h, --help          this help

Without root, use --no-user --no-systemd and writable locations (e.g. --prefix).
EOF
}

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command, or print it under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

parse_args() {
    while (($#)); do
        local opt=$1 val=""
        if [[ $opt == --*=* ]]; then
            val=${opt#*=}
            opt=${opt%%=*}
            shift
            set -- "$opt" "$val" "$@"
        fi
        case $opt in
            --source | --extras | --prefix | --venv | --config-dir | --unit-dir | --python | \
                --pip-args | --user)
                (($# >= 2)) || die "$opt needs a value"
                val=$2
                shift 2
                case $opt in
                    --source) SOURCE=$val ;;
                    --extras) EXTRAS=$val ;;
                    --prefix) PREFIX=${val%/} ;;
                    --venv) VENV=$val ;;
                    --config-dir) CONFIG_DIR=${val%/} ;;
                    --unit-dir) UNIT_DIR=${val%/} ;;
                    --python) PYTHON=$val ;;
                    --pip-args) PIP_ARGS=$val ;;
                    --user) SERVICE_USER=$val ;;
                esac
                ;;
            --system-site-packages) SYSTEM_SITE_PACKAGES=1 && shift ;;
            --enable) ENABLE=1 && shift ;;
            --no-user) CREATE_USER=0 && shift ;;
            --no-systemd) USE_SYSTEMD=0 && shift ;;
            --dry-run) DRY_RUN=1 && shift ;;
            -h | --help) usage && exit 0 ;;
            *) die "unknown option: $opt (see --help)" ;;
        esac
    done
    [[ -n $PREFIX && $PREFIX != /* ]] && PREFIX="$PWD/$PREFIX"
    VENV=${VENV:-$PREFIX$DEFAULT_VENV}
    CONFIG_DIR=${CONFIG_DIR:-$PREFIX$DEFAULT_CONFIG_DIR}
    UNIT_DIR=${UNIT_DIR:-$PREFIX/etc/systemd/system}
    [[ $VENV == /* ]] || VENV="$PWD/$VENV"
    [[ $CONFIG_DIR == /* ]] || CONFIG_DIR="$PWD/$CONFIG_DIR"
    [[ $UNIT_DIR == /* ]] || UNIT_DIR="$PWD/$UNIT_DIR"
    VENV=${VENV%/}
    if ((ENABLE && !USE_SYSTEMD)); then
        die "--enable needs systemd (drop --no-systemd)"
    fi
    return 0
}

check_privileges() {
    if ((DRY_RUN)) || [[ $EUID -eq 0 ]]; then
        return 0
    fi
    if ((CREATE_USER || USE_SYSTEMD)); then
        die "run as root (sudo), or use --no-user --no-systemd with writable locations"
    fi
}

# The pip requirement for SOURCE with the extras attached. A path must contain a '/'
# (./fedmq-0.1.0.tar.gz, ../fedmq) or end in .whl/.tar.gz/.zip; anything else is a
# requirement for the package index ('fedmq', 'fedmq==0.1.0').
requirement() {
    local src=$SOURCE
    case $src in
        . | .. | */* | *.whl | *.tar.gz | *.zip) ;;
        *'['*)
            printf '%s' "$src"
            return 0
            ;;
        *)
            # 'fedmq==0.1.0' -> 'fedmq[edge]==0.1.0'
            local name=${src%%[<>=!~;@ ]*}
            printf '%s[%s]%s' "$name" "$EXTRAS" "${src#"$name"}"
            return 0
            ;;
    esac
    if [[ -d $src ]]; then
        [[ -f $src/pyproject.toml ]] || die "$src is not a fedmq source checkout (no pyproject.toml)"
        printf '%s[%s]' "$(cd -- "$src" && pwd)" "$EXTRAS"
    elif [[ -f $src ]]; then
        case $src in
            *.whl | *.tar.gz | *.zip) ;;
            *) die "$src: expected a .whl, .tar.gz or .zip file" ;;
        esac
        printf '%s/%s[%s]' "$(cd -- "$(dirname -- "$src")" && pwd)" "$(basename -- "$src")" "$EXTRAS"
    else
        die "$src does not exist"
    fi
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (apt-get install python3)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); fedmq needs Python >= 3.11 (Debian 12 / Bookworm)"
    if [[ ! -x $VENV/bin/python ]] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "installing python3-venv"
            run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        else
            die "$PYTHON cannot create virtual environments: apt-get install python3-venv"
        fi
    fi
    local machine
    machine=$(uname -m)
    case $machine in
        x86_64 | aarch64) ;;
        *) warn "no ai-edge-litert wheels for $machine (32-bit Raspberry Pi OS?): use the" \
            "64-bit OS, or install tflite-runtime into $VENV yourself" ;;
    esac
}

create_user() {
    ((CREATE_USER)) || return 0
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        log "user $SERVICE_USER exists"
        return 0
    fi
    log "creating system user $SERVICE_USER"
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "fedmq edge agent" "$SERVICE_USER"
}

REQUIREMENT=""
install_venv() {
    local req=$REQUIREMENT
    if [[ -x $VENV/bin/python ]]; then
        log "upgrading $VENV"
    else
        log "creating $VENV"
        run mkdir -p -- "$(dirname -- "$VENV")"
        local venv_args=()
        ((SYSTEM_SITE_PACKAGES)) && venv_args+=(--system-site-packages)
        run "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    fi
    local pip_args=()
    # Word splitting of --pip-args is intended.
    [[ -n $PIP_ARGS ]] && read -r -a pip_args <<<"$PIP_ARGS"
    log "installing $req"
    run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
        "${pip_args[@]}" "$req"
    ((DRY_RUN)) && return 0
    "$VENV/bin/fedmq" --help >/dev/null || die "$VENV/bin/fedmq --help failed"
    "$VENV/bin/python" -c 'import edge_agent' || die "edge_agent is not importable in $VENV"
    if "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("tensorflow"))'; then
        warn "TensorFlow is importable in $VENV; a device does not need it"
    fi
    log "installed fedmq $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("fedmq"))')"
}

# install MODE SRC DEST [owner group]: chown only when running as root with the user.
install_file() {
    local mode=$1 src=$2 dest=$3 group=${4:-root}
    local owner=()
    if ((CREATE_USER)) && [[ $EUID -eq 0 ]]; then
        owner=(-o root -g "$group")
    fi
    run install -m "$mode" "${owner[@]}" -- "$src" "$dest"
}

install_dir() {
    local mode=$1 dest=$2 group=${3:-root}
    local owner=()
    if ((CREATE_USER)) && [[ $EUID -eq 0 ]]; then
        owner=(-o root -g "$group")
    fi
    run install -d -m "$mode" "${owner[@]}" -- "$dest"
}

install_config() {
    local examples=$SCRIPT_DIR/systemd
    [[ -f $examples/agent.toml.example ]] || die "$examples/agent.toml.example is missing"
    log "configuration in $CONFIG_DIR"
    install_dir 0750 "$CONFIG_DIR" "$SERVICE_USER"
    install_dir 0750 "$CONFIG_DIR/tls" "$SERVICE_USER"
    install_file 0644 "$examples/agent.toml.example" "$CONFIG_DIR/agent.toml.example"
    install_file 0600 "$examples/agent.env.example" "$CONFIG_DIR/agent.env.example"
    if [[ -e $CONFIG_DIR/agent.toml ]]; then
        log "keeping $CONFIG_DIR/agent.toml"
    else
        install_file 0640 "$examples/agent.toml.example" "$CONFIG_DIR/agent.toml" "$SERVICE_USER"
    fi
    if [[ -e $CONFIG_DIR/agent.env ]]; then
        log "keeping $CONFIG_DIR/agent.env"
    else
        install_file 0600 "$examples/agent.env.example" "$CONFIG_DIR/agent.env"
    fi
}

# Escape a string for the replacement side of a sed s|||.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

UNIT_CHANGED=0
install_unit() {
    local src=$SCRIPT_DIR/systemd/$UNIT_NAME dest=$UNIT_DIR/$UNIT_NAME
    [[ -f $src ]] || die "$src is missing"
    local rendered
    rendered=$(sed -e "s|$DEFAULT_VENV/|$(sed_escape "$VENV")/|g" \
        -e "s|$DEFAULT_CONFIG_DIR/|$(sed_escape "$CONFIG_DIR")/|g" \
        -e "s|^User=fedmq\$|User=$(sed_escape "$SERVICE_USER")|" \
        -e "s|^Group=fedmq\$|Group=$(sed_escape "$SERVICE_USER")|" "$src")
    if [[ -f $dest ]] && [[ "$(cat -- "$dest")" == "$rendered" ]]; then
        log "unit $dest is up to date"
        return 0
    fi
    log "installing unit $dest"
    UNIT_CHANGED=1
    install_dir 0755 "$UNIT_DIR"
    if ((DRY_RUN)); then
        printf '+ write %q\n' "$dest"
    else
        local tmp
        tmp=$(mktemp)
        printf '%s\n' "$rendered" >"$tmp"
        install_file 0644 "$tmp" "$dest"
        rm -f -- "$tmp"
    fi
}

setup_systemd() {
    if ((!USE_SYSTEMD)); then
        log "--no-systemd: not running systemctl"
        return 0
    fi
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found (use --no-systemd)"
    if ((UNIT_CHANGED)); then
        run systemctl daemon-reload
    fi
    if command -v systemd-analyze >/dev/null 2>&1 && ((!DRY_RUN)); then
        systemd-analyze verify "$UNIT_DIR/$UNIT_NAME" || warn "systemd-analyze verify complained"
    fi
    if ((ENABLE)); then
        if ((!DRY_RUN)) && grep -q '^host = "mqtt.example.com"' "$CONFIG_DIR/agent.toml"; then
            die "edit $CONFIG_DIR/agent.toml (host, data source) before --enable"
        fi
        run systemctl enable "$UNIT_NAME"
        run systemctl restart "$UNIT_NAME"
        log "started; follow it with: journalctl -u ${UNIT_NAME%.service} -f"
    elif systemctl is-active --quiet "$UNIT_NAME" 2>/dev/null; then
        log "the running service still uses the old version: systemctl restart ${UNIT_NAME%.service}"
    fi
}

main() {
    parse_args "$@"
    check_privileges
    # Resolve the source first: a bad --source must fail before anything is changed.
    REQUIREMENT=$(requirement)
    ((DRY_RUN)) && log "dry run: nothing is changed"
    check_python
    create_user
    install_venv
    install_config
    install_unit
    setup_systemd
    if ((!ENABLE)); then
        cat <<EOF
==> done. Next:
    1. edit $CONFIG_DIR/agent.toml (broker host, data source) and $CONFIG_DIR/agent.env
       (FEDMQ_AGENT_MQTT_PASSWORD); put the broker's CA at $CONFIG_DIR/tls/ca.crt
    2. enrol the device (docs/deployment.md), then: systemctl enable --now ${UNIT_NAME%.service}
EOF
    fi
}

main "$@"
