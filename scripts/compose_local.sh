#!/usr/bin/env bash
# Run docker/compose.yaml for real on this machine, one CCA round end to end, then check and tear down.
#
#   bash scripts/compose_local.sh                 # NUM_SUPERNODES=3 (default here), insecure
#   bash scripts/compose_local.sh --tls           # the same with docker/compose.tls.yaml (certificates generated)
#   bash scripts/compose_local.sh --build-only    # install/build what is missing, run nothing
#
# Engine: Docker where a Docker engine answers (`docker info`), else Podman, installed with apt-get when missing
# (root). On the Podman path the compose file runs through podman-compose (a pinned release from PyPI in a venv
# of its own), containers run with runc and cgroupfs and without default ulimits (a containers.conf of this
# script's, via CONTAINERS_CONF). Unless BASE_IMAGE names one, the base image is built locally once, without any
# container registry (debootstrap of Debian bookworm, which has Python 3.11; cached as
# localhost/fedmerge-base:bookworm), and passed to docker/Dockerfile as BASE_IMAGE. Where the host has pip
# settings, the image build sees them (index, find-links, constraints, certificate bundle and the local folders
# they name, read-only) and the host's network, so pip inside it installs what pip on the host would. The
# compose files themselves are used unchanged.
#
# Steps: build the image; start the SuperLink and wait for its compose health check; start the SuperNodes; start
# `submit` (flwr run) and wait for it to exit (--timeout); read result.json from the SuperLink's `runs` volume and
# check it (NUM_SUPERNODES clients merged, finite accuracy); `compose down -v` (always, unless --keep). On any
# failure the last lines of every container's log are printed. Writes OUT/result.json and OUT/compose_local.json
# (engine, versions, build and run seconds, image size, peak memory per container).
#
# Options (each also as an environment variable):
#   --engine auto|docker|podman   ENGINE           (auto)
#   --supernodes N                NUM_SUPERNODES   (3)
#   --tls                         TLS=1            (0)
#   --timeout SEC                 RUN_TIMEOUT      (900: SuperLink healthy + the whole flwr run)
#   --out DIR                     OUT              (runs/compose-local[-tls])
#   --project NAME                PROJECT          (fedmerge)
#   --keep                        KEEP=1           leave the federation running (compose down -v yourself)
#   --build-only                  BUILD_ONLY=1
#   --no-install                  NO_INSTALL=1     never apt-get/pip install anything; fail instead
# Other variables: BASE_IMAGE (skip the local base), TORCH_INDEX_URL, HOST_PIP=auto|0|1, DEBIAN_MIRROR,
# FEDMERGE_COMPOSE_STATE (cache folder, default ~/.cache/fedmerge/compose), SUPERLINK_PORT, and every variable
# docker/compose.yaml reads (METHOD, EPOCHS, ...).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PODMAN_COMPOSE_VERSION=1.6.0
BASE_TAG=localhost/fedmerge-base:bookworm
IMAGE=fedmerge:latest            # the image: of every service in docker/compose.yaml

ENGINE=${ENGINE:-auto}
NUM_SUPERNODES=${NUM_SUPERNODES:-3}
TLS=${TLS:-0}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
OUT=${OUT:-}
PROJECT=${PROJECT:-fedmerge}
KEEP=${KEEP:-0}
BUILD_ONLY=${BUILD_ONLY:-0}
NO_INSTALL=${NO_INSTALL:-0}
HOST_PIP=${HOST_PIP:-auto}
STATE=${FEDMERGE_COMPOSE_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedmerge/compose}

die() { echo "compose_local: error: $*" >&2; exit 2; }
say() { echo "compose_local: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --engine) ENGINE=${2:?--engine needs a value}; shift 2 ;;
        --supernodes) NUM_SUPERNODES=${2:?--supernodes needs a value}; shift 2 ;;
        --tls) TLS=1; shift ;;
        --timeout) RUN_TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --no-install) NO_INSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

# --- check the options before anything is installed or started ------------------------------------------------
case "$ENGINE" in auto|docker|podman) ;; *) die "ENGINE/--engine must be auto, docker or podman, not '$ENGINE'" ;; esac
[[ "$NUM_SUPERNODES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SUPERNODES/--supernodes must be a positive integer, not '$NUM_SUPERNODES'"
[ "$NUM_SUPERNODES" -ge "${MIN_CLIENTS:-2}" ] || \
    die "NUM_SUPERNODES=$NUM_SUPERNODES is below MIN_CLIENTS=${MIN_CLIENTS:-2}: the round could never start"
[[ "$RUN_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "RUN_TIMEOUT/--timeout must be a positive number of seconds, not '$RUN_TIMEOUT'"
for v in TLS KEEP BUILD_ONLY NO_INSTALL; do
    case "${!v}" in 0|1) ;; *) die "$v must be 0 or 1, not '${!v}'" ;; esac
done
case "$HOST_PIP" in auto|0|1) ;; *) die "HOST_PIP must be auto, 0 or 1, not '$HOST_PIP'" ;; esac
[[ "$PROJECT" =~ ^[a-z0-9][a-z0-9_-]*$ ]] || die "PROJECT/--project must be lower-case letters, digits, - or _, not '$PROJECT'"
if [ -n "${SUPERLINK_PORT:-}" ]; then
    [[ "$SUPERLINK_PORT" =~ ^[0-9]+$ ]] && [ "$SUPERLINK_PORT" -ge 1 ] && [ "$SUPERLINK_PORT" -le 65535 ] || \
        die "SUPERLINK_PORT must be a port number (1-65535), not '$SUPERLINK_PORT'"
fi
RUN_NAME=${RUN_NAME:-docker}
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME must be a plain folder name, not '$RUN_NAME'"
[ -n "$OUT" ] || OUT=runs/compose-local$([ "$TLS" = 1 ] && echo -tls || true)
export NUM_SUPERNODES RUN_NAME

can_install() { [ "$NO_INSTALL" = 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {  # apt_install PKG...: Debian packages, for the Podman path only
    can_install || die "missing: $* (install it, or run as root on Debian/Ubuntu so that this script can)"
    say "apt-get install $*"
    if [ ! -f "$STATE/.apt-updated" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || { sleep 10; apt-get update -q >/dev/null; } || \
            die "apt-get update failed twice"
        mkdir -p "$STATE" && touch "$STATE/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# --- the engine -------------------------------------------------------------------------------------------------
if [ "$ENGINE" = auto ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=podman
    fi
fi

mkdir -p "$STATE"
if [ "$ENGINE" = docker ]; then
    docker info >/dev/null 2>&1 || die "ENGINE=docker but no Docker engine answers ('docker info' fails)"
    docker compose version >/dev/null 2>&1 || die "ENGINE=docker but the Compose plugin is missing ('docker compose')"
    COMPOSE=(docker compose)
else
    need=()
    command -v podman >/dev/null || need+=(podman)
    # crun, Podman's default runtime, fails here on cgroups in hybrid mode and on setrlimit; runc works
    command -v runc >/dev/null || need+=(runc)
    # network names (service DNS) on Podman 4 need netavark + aardvark-dns; netavark sets up NAT with iptables
    [ -x /usr/lib/podman/aardvark-dns ] || [ -x /usr/libexec/podman/aardvark-dns ] || need+=(netavark aardvark-dns)
    command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need+=(iptables)
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
    if [ -n "${CONTAINERS_CONF:-}" ]; then
        [ -f "$CONTAINERS_CONF" ] || die "CONTAINERS_CONF=$CONTAINERS_CONF does not exist (unset it to let this script write one)"
    else
        cgm=systemd
        [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || cgm=cgroupfs  # no systemd to hand cgroups to
        cat > "$STATE/containers.conf" <<EOF
# written by scripts/compose_local.sh
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "$cgm"
events_logger = "file"
EOF
        export CONTAINERS_CONF="$STATE/containers.conf"
    fi
    PC_VENV="$STATE/podman-compose-$PODMAN_COMPOSE_VERSION"
    if [ ! -x "$PC_VENV/bin/podman-compose" ]; then
        [ "$NO_INSTALL" = 0 ] || die "podman-compose $PODMAN_COMPOSE_VERSION missing in $PC_VENV (NO_INSTALL=1)"
        say "installing podman-compose==$PODMAN_COMPOSE_VERSION into $PC_VENV"
        python3 -m venv "$PC_VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$PC_VENV/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" || \
            { rm -rf "$PC_VENV"; die "pip could not install podman-compose==$PODMAN_COMPOSE_VERSION"; }
    fi
    COMPOSE=("$PC_VENV/bin/podman-compose")
fi
say "engine: $ENGINE ($($ENGINE --version))"

FILES=(-f docker/compose.yaml)
if [ "$TLS" = 1 ]; then
    FILES+=(-f docker/compose.tls.yaml)
    bash scripts/gen_certs.sh docker/certs "$NUM_SUPERNODES" >/dev/null || die "scripts/gen_certs.sh failed"
    export CERTS_GID=${CERTS_GID:-$(id -g)}
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }

# the read-only data folder the compose file mounts (../../shared/data from docker/ by default) must exist
if [ -z "${FEDMERGE_DATA_HOST:-}" ] && [ ! -d "$ROOT/../shared/data" ]; then
    first=${FEDMERGE_DATA%%:*}
    if [ -n "${FEDMERGE_DATA:-}" ] && [ -d "$first" ]; then
        FEDMERGE_DATA_HOST=$(cd "$first" && pwd)
    else
        mkdir -p "$STATE/no-data"; FEDMERGE_DATA_HOST="$STATE/no-data"   # cifar10-mini is in the image
    fi
    export FEDMERGE_DATA_HOST
fi

# --- base image (Podman without BASE_IMAGE) -----------------------------------------------------------------------
BUILD_ARGS=()
T_BASE=0
if [ "$ENGINE" = podman ] && [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$BASE_TAG
    if ! podman image exists "$BASE_TAG"; then
        t0=$(now)
        command -v debootstrap >/dev/null || apt_install debootstrap
        mirror=${DEBIAN_MIRROR:-}
        if [ -z "$mirror" ]; then  # the Debian mirror apt already uses
            mirror=$( { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
                        grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
                      } | grep -E '/debian/?$' | head -n1 || true)
            mirror=${mirror:-http://deb.debian.org/debian}
        fi
        rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
        say "building the base image $BASE_TAG: debootstrap bookworm from $mirror (about 1-2 min)"
        for attempt in 1 2; do  # a second try for a dropped download; then give up
            debootstrap --variant=minbase --include=python3,python3-pip,python3-venv bookworm "$rootfs" "$mirror" \
                > "$STATE/debootstrap.log" 2>&1 && break
            if [ "$attempt" = 2 ]; then
                tail -n 20 "$STATE/debootstrap.log" >&2; rm -rf "$rootfs"
                die "debootstrap failed twice (log: $STATE/debootstrap.log)"
            fi
            say "debootstrap failed; trying once more"; rm -rf "$rootfs"; rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
        done
        # like the official image: `python`/`pip` on PATH and pip allowed to install into the system Python
        ln -sf python3 "$rootfs/usr/bin/python"
        rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
        rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | podman import -q \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null || \
            { rm -rf "$rootfs"; die "podman import of the base file system failed (output above)"; }
        rm -rf "$rootfs"
        T_BASE=$(since "$t0")
        say "base image built in ${T_BASE}s"
    fi
fi
[ -z "${BASE_IMAGE:-}" ] || BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

# --- the host's pip settings, for a build that cannot reach the default indexes --------------------------------
if [ "$HOST_PIP" = auto ]; then
    HOST_PIP=0
    if [ "$ENGINE" = podman ] && [ -n "$(python3 -m pip config list 2>/dev/null)" ]; then HOST_PIP=1; fi
fi
if [ "$HOST_PIP" = 1 ]; then
    [ "$ENGINE" = podman ] || die "HOST_PIP=1 needs the Podman path (docker build has no build-time mounts here)"
    # one pip.conf with every setting pip on the host uses (files and PIP_* variables), and the local files and
    # folders it names, mounted read-only at the same paths
    mapfile -t PIP_MOUNTS < <(python3 - "$STATE/pip.conf" <<'EOF'
import configparser, os, subprocess, sys
from urllib.parse import unquote, urlparse
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                     check=True).stdout
cfg = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.partition(".")
    value = value.strip().strip("'\"")
    section = "global" if section in (":env:", "") else section
    # PIP_* variables win over files, as they do on the host
    if section not in cfg or name not in cfg[section] or key.startswith(":env:"):
        cfg.setdefault(section, {})[name] = value
parser = configparser.ConfigParser(interpolation=None)
mounts = set()
for section, values in cfg.items():
    parser[section] = values
    for value in values.values():
        for token in value.split():
            path = unquote(urlparse(token).path) if token.startswith("file:") else token
            if not path.startswith("/") or not os.path.exists(path):
                continue
            if os.path.basename(path.rstrip("/")) == "simple":  # a PEP 503 index links to ../files next to it
                path = os.path.dirname(path.rstrip("/"))
            mounts.add(os.path.realpath(path))
with open(sys.argv[1], "w") as f:
    parser.write(f)
for path in sorted(mounts):
    print(f"--volume={path}:{path}:ro")
print(f"--volume={sys.argv[1]}:/etc/pip.conf:ro")
EOF
    ) || die "could not read the host's pip settings (python3 -m pip config list)"
    BUILD_ARGS+=("${PIP_MOUNTS[@]}")
    # pip takes torch from what the host's settings offer (local copies first); the PyPI index is the fallback
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
    say "image build uses the host's pip settings: ${PIP_MOUNTS[*]}"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

# --- the image ----------------------------------------------------------------------------------------------------
t0=$(now)
if [ "$ENGINE" = podman ]; then
    say "podman build -t $IMAGE (cached layers are reused)"
    podman build --network host --layers "${BUILD_ARGS[@]}" -f docker/Dockerfile -t "$IMAGE" . >&2 || \
        die "podman build failed (output above)"
else
    say "docker compose build"
    export BASE_IMAGE TORCH_INDEX_URL
    [ -n "${BASE_IMAGE:-}" ] || unset BASE_IMAGE
    [ -n "${TORCH_INDEX_URL:-}" ] || unset TORCH_INDEX_URL
    compose build superlink >&2 || die "docker compose build failed (output above)"
fi
T_BUILD=$(since "$t0")
IMAGE_SIZE=$($ENGINE image inspect -f '{{.Size}}' "$IMAGE")
say "image $IMAGE: $((IMAGE_SIZE / 1000000)) MB, build step ${T_BUILD}s"
if [ "$BUILD_ONLY" = 1 ]; then exit 0; fi

# --- run ----------------------------------------------------------------------------------------------------------
mkdir -p "$OUT"
rm -f "$OUT/result.json" "$OUT/compose_local.json"
ids() {  # ids SERVICE: the project's containers of one service (both engines label them the Compose way)
    $ENGINE ps -a -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"
}
dump_logs() {
    for id in $($ENGINE ps -a -q --filter "label=com.docker.compose.project=$PROJECT"); do
        echo "----- $($ENGINE inspect -f '{{.Name}} ({{.State.Status}}, exit {{.State.ExitCode}})' "$id") -----" >&2
        $ENGINE logs --tail 60 "$id" 2>&1 | sed 's/^/  /' >&2 || true
    done
}
OK=0
teardown() {
    local rc=$?
    set +e
    if [ "$OK" != 1 ]; then say "FAILED; container logs:"; dump_logs; fi
    if [ "$KEEP" = 1 ]; then
        say "left running (--keep): ${COMPOSE[*]} -p $PROJECT ${FILES[*]} down -v"
    else
        timeout 180 "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" down -v -t 5 >/dev/null 2>&1 || \
            say "compose down failed: remove the '$PROJECT' containers, network and volume by hand"
    fi
    exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

# leftovers of an interrupted run of this project would be reused: start clean
compose down -v -t 5 >/dev/null 2>&1 || true

t_run=$(now)
deadline=$(( $(date +%s) + RUN_TIMEOUT ))
say "starting the SuperLink"
compose up -d --no-build superlink >&2 || die "compose up superlink failed"
sl=$(ids superlink); [ -n "$sl" ] || die "no superlink container after compose up"
# wait for the compose health check; Podman without systemd has no timer to run it, so run it here
while :; do
    state=$($ENGINE inspect -f '{{.State.Status}}' "$sl")
    [ "$state" = running ] || die "the SuperLink container is '$state', not running"
    if [ "$ENGINE" = podman ]; then
        podman healthcheck run "$sl" >/dev/null 2>&1 && break
    else
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$sl")" = healthy ] && break
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "the SuperLink was not healthy within ${RUN_TIMEOUT}s"
    sleep 1
done
T_HEALTHY=$(since "$t_run")
say "SuperLink healthy after ${T_HEALTHY}s; starting $NUM_SUPERNODES SuperNodes and the submit service"
compose up -d --no-build --no-deps supernode >&2 || die "compose up supernode failed"
compose up -d --no-build --no-deps submit >&2 || die "compose up submit failed"
sub=$(ids submit); [ -n "$sub" ] || die "no submit container after compose up"
nodes=$(ids supernode)
[ "$(echo "$nodes" | wc -w)" = "$NUM_SUPERNODES" ] || \
    die "expected $NUM_SUPERNODES supernode containers, found $(echo "$nodes" | wc -w)"

# wait for `flwr run` to end; sample each container's memory meanwhile (peak of the samples, every ~2 s)
STATS="$OUT/.stats"; : > "$STATS"
while [ "$($ENGINE inspect -f '{{.State.Status}}' "$sub")" != exited ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        $ENGINE logs --tail 40 "$sub" >&2 || true
        die "flwr run did not end within ${RUN_TIMEOUT}s (--timeout)"
    fi
    $ENGINE stats --no-stream --format '{{.Name}}|{{.MemUsage}}' $sl $nodes >> "$STATS" 2>/dev/null || true
    sleep 2
done
T_RUN=$(since "$t_run")
code=$($ENGINE inspect -f '{{.State.ExitCode}}' "$sub")
say "flwr run ended (exit $code) ${T_RUN}s after compose up"
[ "$code" = 0 ] || die "the submit service (flwr run) exited with $code"
$ENGINE logs "$sub" > "$OUT/submit.log" 2>&1 || true
# `flwr run --stream` exits 0 even when the ServerApp failed: its error is in the streamed log
if ! $ENGINE exec "$sl" cat "/app/runs/$RUN_NAME/result.json" > "$OUT/result.json" 2>/dev/null; then
    why=$(grep -E '^[A-Za-z_.]*(Error|Exception): ' "$OUT/submit.log" | tail -n 1 || true)
    die "no /app/runs/$RUN_NAME/result.json in the SuperLink's runs volume${why:+: the ServerApp failed: $why}"
fi
SUPERLINK_ARGS=$($ENGINE inspect -f '{{json .Config.Cmd}}' "$sl")

python3 - "$OUT" "$NUM_SUPERNODES" "$ENGINE" "$($ENGINE --version)" "$T_BASE" "$T_BUILD" "$IMAGE_SIZE" \
        "$T_HEALTHY" "$T_RUN" "$TLS" "$PROJECT" "$SUPERLINK_ARGS" <<'EOF'
import json, math, re, sys
out, n, engine, version, t_base, t_build, size, t_healthy, t_run, tls, project, sl_args = sys.argv[1:]
n = int(n)
result = json.load(open(f"{out}/result.json"))
merged = result.get("clients_merged")
acc = (result.get("accuracy") or {}).get("merged")
errors = []
if not isinstance(merged, list) or len(merged) != n:
    errors.append(f"clients_merged is {merged!r}, expected {n} clients")
if result.get("clients_rejected"):
    errors.append(f"clients rejected: {result['clients_rejected']!r}")
if not isinstance(acc, (int, float)) or not math.isfinite(acc):
    errors.append(f"merged accuracy is {acc!r}, expected a finite number")
units = {"b": 1, "kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30}
peak = {}
for line in open(f"{out}/.stats"):
    name, _, usage = line.strip().partition("|")
    m = re.match(r"\s*([\d.]+)\s*([a-zA-Z]+)", usage)
    if m and m.group(2).lower() in units:
        value = float(m.group(1)) * units[m.group(2).lower()] / 2**20
        peak[name] = max(peak.get(name, 0.0), value)
report = {"engine": engine, "engine_version": version, "tls": tls == "1", "num_supernodes": n,
          "base_image_seconds": float(t_base), "build_seconds": float(t_build), "image_bytes": int(size),
          "superlink_healthy_seconds": float(t_healthy), "run_seconds": float(t_run),
          "peak_memory_mib": {k.removeprefix(f"{project}_").removeprefix(f"{project}-"): round(v, 1)
                              for k, v in sorted(peak.items())},
          "superlink_command": json.loads(sl_args),
          "method": result.get("method"), "clients_merged": merged, "accuracy_merged": acc,
          "checks": "failed: " + "; ".join(errors) if errors else "passed"}
json.dump(report, open(f"{out}/compose_local.json", "w"), indent=2)
print(json.dumps(report, indent=2))
sys.exit(1 if errors else 0)
EOF
rm -f "$STATS"
OK=1
say "OK: $NUM_SUPERNODES clients merged; $OUT/result.json, $OUT/compose_local.json"
