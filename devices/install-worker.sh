#!/usr/bin/env bash
# Install (or update) the edgemoe worker on a board. Safe to run again: every step checks first.
#
#   sudo devices/install-worker.sh                         # venv + unit + profiles, starts nothing
#   sudo devices/install-worker.sh --name pi-01 \
#        --connect tcp://10.0.0.1:5555 --model /srv/edgemoe/models/mixtral-q4_k_m \
#        --profile raspberry-pi-4-1gb \
#        --coordinator-key coordinator.key                # + /etc/edgemoe/worker-pi-01.env, keys
#   sudo devices/install-worker.sh --name pi-01 --enable   # + enable at boot
#   sudo devices/install-worker.sh --name pi-01 --start    # + enable and start now
#
# What it does, and nothing else:
#   - creates /opt/edgemoe/.venv (python3 -m venv) and pip-installs edgemoe from THIS checkout
#     (or, with --wheels DIR, from wheels in DIR without the network: --no-index);
#   - copies devices/profiles/*.toml and devices/README.md to /opt/edgemoe/;
#   - installs devices/systemd/edgemoe-worker@.service into /etc/systemd/system/;
#   - with --name: writes /etc/edgemoe/worker-NAME.env (never overwrites an existing one unless
#     --force) and a MemoryMax drop-in sized from the profile's budget;
#   - with --name: the worker's key pair /etc/edgemoe/keys/worker-NAME.key{,_secret} (edgemoe keygen,
#     secret 0600 in a 0700 folder; never replaced) and prints its public key for the coordinator's
#     --allow list; with --coordinator-key FILE: installs the coordinator's public key as
#     /etc/edgemoe/coordinator.key (docs/SECURITY.md);
#   - with --enable / --start: systemctl enable [--now] edgemoe-worker@NAME.
# It downloads no scripts and runs nothing it fetched; pip is the only network client (avoid it
# with --wheels, or skip it with --no-pip when the venv is already up to date). It deletes nothing
# but its own temporary files. EDGEMOE_INSTALL_ROOT=DIR stages everything under DIR instead of /
# and skips systemctl (for packaging and for testing this script).
set -euo pipefail

ROOT="${EDGEMOE_INSTALL_ROOT:-}"
PREFIX=/opt/edgemoe            # paths as the unit sees them ...
ETC=/etc/edgemoe
UNIT_DIR=/etc/systemd/system
MODELS=/srv/edgemoe/models
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NAME="" CONNECT="" MODEL="" PROFILE="" WHEELS="" COORD_KEY="" ENABLE=0 START=0 FORCE=0 PIP=1

die() { echo "install-worker: error: $*" >&2; exit 2; }
say() { echo "install-worker: $*"; }
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME="${2:?--name needs a value}"; shift 2 ;;
        --connect) CONNECT="${2:?--connect needs a value}"; shift 2 ;;
        --model) MODEL="${2:?--model needs a value}"; shift 2 ;;
        --profile) PROFILE="${2:?--profile needs a value}"; shift 2 ;;
        --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
        --coordinator-key) COORD_KEY="${2:?--coordinator-key needs a file}"; shift 2 ;;
        --enable) ENABLE=1; shift ;;
        --start) ENABLE=1; START=1; shift ;;
        --force) FORCE=1; shift ;;
        --no-pip) PIP=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install-worker: unknown argument: $1" >&2; usage 2 ;;
    esac
done

if [ -z "$ROOT" ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...)"
else
    [ -d "$ROOT" ] || die "EDGEMOE_INSTALL_ROOT=$ROOT: not a directory"
fi
R_PREFIX="$ROOT$PREFIX" R_ETC="$ROOT$ETC" R_UNIT_DIR="$ROOT$UNIT_DIR"   # ... and where they are written
systemctl_() { if [ -z "$ROOT" ]; then systemctl "$@"; else say "(staged: skipping systemctl $*)"; fi; }
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/devices/systemd/edgemoe-worker@.service" ] \
    || die "$SRC does not look like an edgemoe checkout"
if [ -n "$NAME" ]; then
    [[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$ ]] || die "--name $NAME: use A-Z a-z 0-9 . _ : @ - (at most 64)"
fi
if [ "$ENABLE" -eq 1 ] && [ -z "$NAME" ]; then die "--enable/--start need --name"; fi
command -v python3 >/dev/null || die "python3 is not installed (apt install python3 python3-venv)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); edgemoe workers need 3.11 or newer"
python3 -c 'import venv, ensurepip' 2>/dev/null || die "python3's venv module is missing (apt install python3-venv)"
[ -n "$ROOT" ] || command -v systemctl >/dev/null || die "systemctl not found: this installer is for systemd systems"

# 1. the virtual environment ---------------------------------------------------------------------
install -d -m 0755 "$R_PREFIX" "$R_PREFIX/profiles" "$R_PREFIX/devices" "$R_ETC" "$ROOT$MODELS" "$R_UNIT_DIR"
VENV="$R_PREFIX/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
if [ "$PIP" -eq 0 ]; then
    say "--no-pip: keeping the edgemoe installed in $VENV"
elif [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "--wheels $WHEELS: not a directory"
    say "installing edgemoe from wheels in $WHEELS (no network)"
    "$VENV/bin/pip" install --no-index --find-links "$WHEELS" --upgrade edgemoe
else
    # llama-cpp-python compiles llama.cpp on the board the first time (long on a Pi; pip caches it).
    say "installing edgemoe from $SRC"
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$VENV/bin/pip" install --upgrade "$SRC"
fi
"$VENV/bin/edgemoe" --version

# 2. profiles, docs, unit ------------------------------------------------------------------------
install -m 0644 "$SRC"/devices/profiles/*.toml "$R_PREFIX/profiles/"
install -m 0644 "$SRC/devices/README.md" "$R_PREFIX/devices/README.md"
UNIT="$R_UNIT_DIR/edgemoe-worker@.service"
if ! cmp -s "$SRC/devices/systemd/edgemoe-worker@.service" "$UNIT"; then
    say "installing $UNIT"
    install -m 0644 "$SRC/devices/systemd/edgemoe-worker@.service" "$UNIT"
fi

# 3. one instance --------------------------------------------------------------------------------
if [ -n "$NAME" ]; then
    ENV_FILE="$R_ETC/worker-$NAME.env"
    if [ -f "$ENV_FILE" ] && [ "$FORCE" -eq 0 ]; then
        say "keeping existing $ENV_FILE (use --force to rewrite it)"
    else
        [ -n "$CONNECT" ] && [ -n "$MODEL" ] && [ -n "$PROFILE" ] \
            || die "writing $ENV_FILE needs --connect, --model and --profile"
        case "$PROFILE" in */*) ;; *) PROFILE="$PREFIX/profiles/${PROFILE%.toml}.toml" ;; esac
        [ -f "$ROOT$PROFILE" ] || die "--profile: $PROFILE not found (see $PREFIX/profiles/)"
        "$VENV/bin/python" -c 'import sys; from edgemoe.cluster.profile import load_profile; load_profile(sys.argv[1])' \
            "$ROOT$PROFILE" 2>/dev/null || die "--profile: $PROFILE is not a valid profile (edgemoe worker --profile says why)"
        [ -f "$ROOT$MODEL/manifest.json" ] || say "warning: $MODEL/manifest.json not found yet: copy the model before starting"
        case "$CONNECT" in tcp://*:*) ;; *) die "--connect $CONNECT: expected tcp://HOST:PORT" ;; esac
        tmp="$(mktemp "$R_ETC/.worker-$NAME.env.XXXXXX")"
        printf 'EDGEMOE_CONNECT=%s\nEDGEMOE_MODEL=%s\nEDGEMOE_PROFILE=%s\nEDGEMOE_ARGS=\n' \
            "$CONNECT" "$MODEL" "$PROFILE" >"$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$ENV_FILE"
        say "wrote $ENV_FILE"
    fi
    # MemoryMax a little above the worker's own budget (the budget bounds its RSS; this is the backstop)
    PROFILE_PATH="$(sed -n 's/^EDGEMOE_PROFILE=//p' "$ENV_FILE" | tail -n 1)"
    if [ -n "$PROFILE_PATH" ] && [ -f "$ROOT$PROFILE_PATH" ]; then
        max_bytes="$("$VENV/bin/python" -c '
import sys
from edgemoe.cluster.profile import load_profile
b = load_profile(sys.argv[1]).memory_budget
print(b + max(32 << 20, b // 10))' "$ROOT$PROFILE_PATH")"
        DROPIN_DIR="$R_UNIT_DIR/edgemoe-worker@$NAME.service.d"
        install -d -m 0755 "$DROPIN_DIR"
        printf '[Service]\nMemoryMax=%s\n' "$max_bytes" >"$DROPIN_DIR/.10-memory.conf.new"
        if cmp -s "$DROPIN_DIR/.10-memory.conf.new" "$DROPIN_DIR/10-memory.conf"; then
            rm -f "$DROPIN_DIR/.10-memory.conf.new"
        else
            mv -f "$DROPIN_DIR/.10-memory.conf.new" "$DROPIN_DIR/10-memory.conf"
            say "MemoryMax=$max_bytes for edgemoe-worker@$NAME"
        fi
    else
        say "warning: profile ${PROFILE_PATH:-?} not found: the unit's default MemoryMax applies"
    fi
fi

# 4. keys ----------------------------------------------------------------------------------------
if [ -n "$COORD_KEY" ]; then
    [ -f "$COORD_KEY" ] || die "--coordinator-key $COORD_KEY: not a file"
    "$VENV/bin/python" -c 'import sys; from edgemoe.cluster.keys import load_public; load_public(sys.argv[1])' "$COORD_KEY" \
        2>/dev/null || die "--coordinator-key $COORD_KEY: not a public key (edgemoe keygen's NAME.key)"
    install -m 0644 "$COORD_KEY" "$R_ETC/coordinator.key"
    say "installed the coordinator's public key as $ETC/coordinator.key"
fi
if [ -n "$NAME" ]; then
    install -d -m 0700 "$R_ETC/keys"
    if [ -f "$R_ETC/keys/worker-$NAME.key_secret" ]; then
        say "keeping the key pair $ETC/keys/worker-$NAME.key_secret"
    else
        (umask 077; "$VENV/bin/edgemoe" keygen "$R_ETC/keys" --name "worker-$NAME" >/dev/null)
        say "wrote the key pair $ETC/keys/worker-$NAME.key_secret"
    fi
    pub="$("$VENV/bin/python" -c 'import sys; from edgemoe.cluster.keys import load_public; print(load_public(sys.argv[1]).decode())' \
        "$R_ETC/keys/worker-$NAME.key")"
    say "add this line to the coordinator's --allow file: $pub $NAME"
    [ -f "$R_ETC/coordinator.key" ] || say "warning: $ETC/coordinator.key is missing: give --coordinator-key FILE before starting"
fi

systemctl_ daemon-reload

if [ "$ENABLE" -eq 1 ]; then
    systemctl_ enable "edgemoe-worker@$NAME.service"
fi
if [ "$START" -eq 1 ]; then
    systemctl_ restart "edgemoe-worker@$NAME.service"
    say "started; follow it with: journalctl -u edgemoe-worker@$NAME -f"
elif [ -n "$NAME" ]; then
    say "not started. When the model is in place: systemctl enable --now edgemoe-worker@$NAME"
fi
say "done"
