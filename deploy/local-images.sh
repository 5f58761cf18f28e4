#!/usr/bin/env bash
# `docker compose up` on a machine that reaches package registries but no image registry (the
# compose test in CI, or a person on such a machine):
#
#   deploy/local-images.sh up     install what is missing (Debian's docker.io and debootstrap;
#                                 compose v2 from the next Debian release), start dockerd unless
#                                 an engine answers, build the base images unless they are there,
#                                 and put the torch wheel into the build context
#   IAT_API_TOKEN=... docker compose -f docker-compose.yml -f deploy/compose.local.yml up -d --build
#   deploy/local-images.sh down   stop the dockerd that `up` started (none if an engine was
#                                 already running) and put back the iptables FORWARD policy that
#                                 dockerd changed
#
# Base images (kept between runs; `IAT_LOCAL_REBUILD=1` builds them again):
#   iat-local/debian:<codename>  debootstrap --variant=minbase of this machine's Debian release,
#                                from the mirror apt is configured with, then `docker import`
#   iat-local/python|redis|prometheus  the stages of deploy/local/Dockerfile on top of it (the
#                                names deploy/compose.local.yml uses)
# The certificate bundle and pip configuration the builds need are read from this machine at
# build time and never written into the repository. The torch wheel is copied (or hard-linked)
# from pip's find-links folders into deploy/wheels/, which git ignores and deploy/Dockerfile reads.
#
# Needs root for apt-get, dockerd and debootstrap. Non-interactive throughout (CI has no stdin).
# Exit status 3: no container engine can be started here (the compose test skips on it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Machine-wide state: one dockerd per machine, whichever checkout started it.
STATE=${IAT_LOCAL_STATE:-/run/iat-local-images}
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
# Compose v2 is packaged from Debian 13 on; it is one static binary that installs on 12 as well.
COMPOSE_SUITE=${IAT_COMPOSE_SUITE:-trixie}
NO_ENGINE=3
export DEBIAN_FRONTEND=noninteractive

log() { printf 'local-images: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

engine_answers() { docker info >/dev/null 2>&1; }

# The Debian mirror apt uses for this release, read from apt's own configuration.
debian_mirror() {
  apt-get indextargets --format '$(REPO_URI)' "Release: $CODENAME" "Identifier: Packages" \
    "Component: main" 2>/dev/null | head -n 1
}

APT_UPDATED=
apt_install() {
  is_root || die "missing $*: install them as root (apt-get install $*)"
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq </dev/null
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

compose_v2() { docker compose version --short 2>/dev/null | grep -q '^v\?2\.'; }

# Debian 12 ships compose v1 only: fetch the newer release's docker-compose from the same mirror
# through a throw-away apt configuration (the system's sources stay as they are).
install_compose_v2() {
  local mirror tmp
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror configured for $CODENAME in apt's sources"
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $COMPOSE_SUITE main" >"$tmp/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root)
  log "docker compose v2: docker-compose from Debian $COMPOSE_SUITE"
  apt-get "${opts[@]}" update -qq </dev/null
  (cd "$tmp" && apt-get "${opts[@]}" download docker-compose </dev/null >/dev/null)
  apt-get install -y -qq "$tmp"/docker-compose_*.deb </dev/null >/dev/null
  rm -rf "$tmp"
}

install_missing() {
  local wanted=()
  command -v dockerd >/dev/null || wanted+=(docker.io)
  command -v docker >/dev/null || wanted+=(docker.io)
  command -v debootstrap >/dev/null || wanted+=(debootstrap)
  command -v iptables >/dev/null || wanted+=(iptables)
  if [ ${#wanted[@]} -gt 0 ] && ! (apt_install $(printf '%s\n' "${wanted[@]}" | sort -u)); then
    log "could not install ${wanted[*]}: no container engine here"
    exit $NO_ENGINE
  fi
  compose_v2 || install_compose_v2
  compose_v2 || die "docker compose v2 is not available after installing it"
}

forward_policy() { iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3; exit}'; }

start_engine() {
  if engine_answers; then
    if [ -f "$STATE/dockerd.pid" ] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
      log "dockerd from an earlier \`up\` is running (pid $(cat "$STATE/dockerd.pid")): down stops it"
    else
      log "a container engine is already running: using it (down leaves it running)"
    fi
    return 0
  fi
  if ! is_root || ! command -v dockerd >/dev/null; then
    log "no container engine answers and dockerd cannot be started here (needs root and docker.io)"
    exit $NO_ENGINE
  fi
  mkdir -p "$STATE"
  # dockerd sets the FORWARD policy to DROP; `down` puts back what was there.
  forward_policy >"$STATE/forward-policy" || true
  log "starting dockerd (log: $STATE/dockerd.log)"
  setsid dockerd >"$STATE/dockerd.log" 2>&1 </dev/null &
  echo $! >"$STATE/dockerd.pid"
  local deadline=$((SECONDS + 90))
  until engine_answers; do
    if ! kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      log "dockerd did not come up:"
      tail -n 20 "$STATE/dockerd.log" >&2 || true
      stop_engine
      exit $NO_ENGINE
    fi
    sleep 0.5
  done
}

stop_engine() {
  local pidfile="$STATE/dockerd.pid"
  if [ -f "$pidfile" ]; then
    local pid deadline
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping dockerd (pid $pid)"
      kill -TERM "$pid"
      deadline=$((SECONDS + 60))
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
  fi
  if [ -s "$STATE/forward-policy" ]; then
    iptables -P FORWARD "$(cat "$STATE/forward-policy")"
    rm -f "$STATE/forward-policy"
  fi
}

image_label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

build_debian() {
  local image=iat-local/debian:$CODENAME
  if docker image inspect "$image" >/dev/null 2>&1 && [ -z "${IAT_LOCAL_REBUILD:-}" ]; then
    return 0
  fi
  is_root || die "debootstrap needs root"
  local mirror rootfs
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror configured for $CODENAME in apt's sources"
  rootfs=$(mktemp -d /var/tmp/iat-debootstrap.XXXXXX)
  log "debootstrap --variant=minbase $CODENAME (a few minutes, once)"
  debootstrap --variant=minbase "$CODENAME" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; die "debootstrap failed"; }
  # As Docker's own Debian images: no service starts from a package's postinst in a build.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod +x "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$image" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

# The trust store pip and TLS clients on this machine use.
host_ca_bundle() {
  local candidate
  for candidate in "${PIP_CERT:-}" "$(python3 -m pip config get global.cert 2>/dev/null || true)" \
                   "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  die "no certificate bundle found (PIP_CERT, pip's global.cert, SSL_CERT_FILE, /etc/ssl/certs)"
}

# pip.conf for the builds: this machine's index settings (environment first, then pip's config
# files), keeping only URLs a container can reach (http/https, not file://).
write_pip_conf() {
  python3 - "$1" <<'PY'
import os, re, subprocess, sys

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                        capture_output=True, text=True).stdout
config = {}
for line in listed.splitlines():
    match = re.match(r"(?:global|install|:env:)\.([\w-]+)='(.*)'$", line)
    if match:
        config.setdefault(match.group(1), match.group(2))
for key in ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries"):
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        config[key] = env
lines = ["[global]", "cert = /etc/ssl/host-ca-bundle.crt"]
for key in ("index-url", "extra-index-url"):
    urls = [u for u in config.get(key, "").split() if u.startswith(("http://", "https://"))]
    if urls:
        lines.append(f"{key} = {' '.join(urls)}")
for key in ("trusted-host", "retries"):
    if config.get(key):
        lines.append(f"{key} = {config[key]}")
timeout = config.get("timeout") or config.get("default-timeout")
if timeout:
    lines.append(f"timeout = {timeout}")
with open(sys.argv[1], "w") as fh:
    fh.write("\n".join(lines) + "\n")
PY
}

build_stages() {
  local ctx recipe stage image
  ctx=$(mktemp -d)
  cp "$(host_ca_bundle)" "$ctx/host-ca-bundle.crt"
  write_pip_conf "$ctx/pip.conf"
  # Rebuilt when the recipe or what it copies from this machine changes.
  recipe=$( (docker image inspect -f '{{.Id}}' "iat-local/debian:$CODENAME"
              cat "$ROOT/deploy/local/Dockerfile" "$ctx/host-ca-bundle.crt" "$ctx/pip.conf") | sha256sum | cut -c1-16)
  for stage in python redis prometheus; do
    image=iat-local/$stage
    if [ "$(image_label "$image" iat.local.recipe)" = "$recipe" ] && [ -z "${IAT_LOCAL_REBUILD:-}" ]; then
      continue
    fi
    log "building $image"
    docker build --target "$stage" --build-arg "DEBIAN_IMAGE=iat-local/debian:$CODENAME" \
      --label "iat.local.recipe=$recipe" -t "$image" -f "$ROOT/deploy/local/Dockerfile" "$ctx" >"$ctx.log" 2>&1 \
      || { tail -n 30 "$ctx.log" >&2; rm -rf "$ctx" "$ctx.log"; die "building $image failed"; }
  done
  rm -rf "$ctx" "$ctx.log"
}

# torch comes from the machine's CPU wheel (pip's find-links folders), not from an index.
stage_torch_wheel() {
  local version dirs dir wheel
  version=$(sed -n 's/^torch==\(.*\)$/\1/p' "$ROOT/constraints.txt")
  [ -n "$version" ] || die "constraints.txt pins no torch version"
  if ls "$ROOT"/deploy/wheels/torch-"$version"[+-]*.whl >/dev/null 2>&1; then
    return 0
  fi
  dirs="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true) /opt/wheels"
  for dir in $dirs; do
    dir=${dir#file://}
    wheel=$(ls "$dir"/torch-"$version"+cpu-cp311-*.whl "$dir"/torch-"$version"-cp311-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then
      log "torch wheel: $(basename "$wheel") into deploy/wheels/"
      ln -f "$wheel" "$ROOT/deploy/wheels/" 2>/dev/null || cp "$wheel" "$ROOT/deploy/wheels/"
      return 0
    fi
  done
  log "no torch-$version cp311 wheel in pip's find-links ($dirs): the build installs torch from its index"
}

case "${1:-}" in
  up)
    [ -n "$CODENAME" ] || die "not a Debian release with a codename (/etc/os-release)"
    install_missing
    start_engine
    build_debian
    build_stages
    stage_torch_wheel
    log "ready: docker compose -f docker-compose.yml -f deploy/compose.local.yml up -d --build"
    ;;
  down)
    stop_engine
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
