#!/usr/bin/env bash
# Puts Debian's prometheus and promtool in a cache directory and prints the
# directory that holds them (add it to PATH).
#
# The package is unpacked, not installed: no service starts, no user is
# created, no dependency comes along (the two programs are Go binaries that
# need only libc; the web UI's JavaScript, which the dependencies bring, is
# not needed for the API and the rule checks). About 20 MB to download and 100 MB
# on disk, a few seconds; a second run finds the cache and does nothing.
#
# Usage: hack/install-prometheus.sh
#   KAP_PROMETHEUS_DIR  where to unpack (default: ~/.cache/kap-prometheus)
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 0
fi

dest="${KAP_PROMETHEUS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kap-prometheus}"
bin="$dest/usr/bin"
if [ -x "$bin/promtool" ] && [ -x "$bin/prometheus" ]; then
  echo "$bin"
  exit 0
fi

for tool in apt-get dpkg-deb; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install-prometheus: $tool not found (Debian's apt is needed)" >&2
    exit 1
  fi
done

mkdir -p "$(dirname "$dest")"
work="$(mktemp -d "$dest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt-get drops to the _apt user for downloads unless told otherwise; it
# cannot write into a private temporary directory.
download() {
  (cd "$work" && apt-get download -q -o APT::Sandbox::User=root prometheus)
}
if ! download >/dev/null 2>&1; then
  # A fresh machine has no package lists yet (updating them needs root).
  apt-get update -qq >/dev/null
  download >/dev/null
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
"$work/root/usr/bin/promtool" --version >/dev/null
rm -rf "$dest"
mv "$work/root" "$dest"
echo "$bin"
