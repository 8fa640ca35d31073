#!/usr/bin/env bash
# Debian packages the project runs with. Installs only what is missing; needs root (CI and the dev
# VMs run as root).
#   scripts/system-deps.sh          docker-compose (validates the compose file), redis-server
#                                   (cache and integration tests)
#   scripts/system-deps.sh test     also chromium + chromium-driver (the playground's browser
#                                   test, headless, driven by Selenium; `make test`)
#   scripts/system-deps.sh bench    also wrk (the gateway-overhead benchmark's load generator)
set -euo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${1:-}" = test ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
if [ "${1:-}" = bench ]; then
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
