#!/usr/bin/env bash
# Installs the peers that meshbench runs beside ztgo, when they are missing: stunnel4 (the
# stunnel pair, Debian's package). Istio's HBONE pair needs nothing here: meshbench builds
# perf/cmd/istiohbone itself. As root it installs with apt-get (updating the package lists
# only when the first try fails, as on a fresh machine); otherwise it says how to install and
# goes on, since meshbench skips a missing peer with a line in its report.
set -euo pipefail

if command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-peers: stunnel4 is not installed; meshbench will skip the stunnel pair (install it with: sudo apt-get install -y stunnel4)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-peers: installing stunnel4"
if apt-get install -y -qq stunnel4 || { apt-get update -qq && apt-get install -y -qq stunnel4; }; then
  exit 0
fi
echo "install-peers: could not install stunnel4; meshbench will skip the stunnel pair" >&2
