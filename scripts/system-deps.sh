#!/usr/bin/env bash
# System packages the test suite uses (Debian): docker-compose to validate the compose files,
# redis-server for the cache and integration tests (started by the tests on loopback ports).
# Installs only what is missing; needs root (CI and the dev VMs run as root).
set -euo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${need[*]}; install them (apt-get install ${need[*]}) or the" \
       "tests that use them are skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
