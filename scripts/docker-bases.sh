#!/usr/bin/env bash
# Builds the base images the compose stack needs from Debian packages, for hosts that cannot pull
# from Docker Hub (air-gapped clusters, internal mirrors only): debootstrap a bookworm root file
# system with the packages, then `docker import` it. Needs root, debootstrap and a Docker daemon.
#
#   scripts/docker-bases.sh [python] [redis] [prometheus]     (default: python redis)
#
# Images (pass them to the builds with --build-arg BASE_IMAGE=..., see deploy/README.md):
#   gainrag-base/python:bookworm      python3 3.11 + venv, ca-certificates, curl (python:3.11-slim's role)
#   gainrag-base/redis:bookworm       Debian's redis-server (7.0), CMD redis-server
#   gainrag-base/prometheus:bookworm  Debian's prometheus (2.42), CMD prometheus
# An image that already exists is kept (FORCE=1 rebuilds it).
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=${BASE_PREFIX:-gainrag-base}
WORK=${WORK_DIR:-/var/tmp/gainrag-bases}
FORCE=${FORCE:-0}

[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker daemon answers (see deploy/README.md)" >&2; exit 1; }

# name -> packages on top of minbase, and the image's Dockerfile-style changes.
build() {
  local name=$1 include=$2; shift 2
  local image="$PREFIX/$name:$SUITE" root="$WORK/$name"
  if [[ $FORCE != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image exists (FORCE=1 rebuilds it)"; return
  fi
  local t0=$SECONDS
  rm -rf "$root"; mkdir -p "$root"
  # minbase: dpkg, apt and the essentials only; the image keeps apt so Dockerfiles can add to it.
  debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$MIRROR"
  # Smaller image: no package lists, caches, docs or man pages (apt-get update fetches lists again).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  local changes=(--change "ENV LANG=C.UTF-8" --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
  for c in "$@"; do changes+=(--change "$c"); done
  tar -C "$root" -c . | docker import "${changes[@]}" - "$image" >/dev/null
  rm -rf "$root"
  echo "$image built in $((SECONDS - t0)) s"
}

targets=("$@"); [[ ${#targets[@]} -gt 0 ]] || targets=(python redis)
for t in "${targets[@]}"; do
  case $t in
    # python3-venv gives ensurepip (pip inside venvs); curl serves the healthchecks.
    python) build python python3,python3-venv,ca-certificates,curl 'CMD ["python3"]' ;;
    # redis-server brings redis-cli (the compose healthcheck). Protected mode off as in the
    # official image: the cache is reached over the compose network, not published on the host.
    redis) build redis redis-server \
             'CMD ["redis-server", "--protected-mode", "no"]' 'EXPOSE 6379' ;;
    # wget: the compose healthcheck. Debian's prometheus runs as root here (no init system).
    prometheus) build prometheus prometheus,wget,ca-certificates \
             'ENTRYPOINT ["/usr/bin/prometheus"]' \
             'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
             'EXPOSE 9090' ;;
    *) echo "unknown base: $t (python, redis, prometheus)" >&2; exit 2 ;;
  esac
done
