#!/bin/sh
# Installs Debian's chromium for the browser tests (tests/browser), only when it is missing.
# Silent when chromium is there. It never fails the command that runs it: without chromium the
# browser tests fail and say why, unless PROMPTQ_SKIP_BROWSER_TESTS=1 skips them on purpose.
chromium="${PROMPTQ_CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] && exit 0
[ "${PROMPTQ_SKIP_BROWSER_TESTS:-}" = "1" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install chromium yourself (PROMPTQ_CHROMIUM=/path/to/it)" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
echo "installing chromium for the browser tests (apt-get install chromium)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt="$sudo apt-get -qq -o DPkg::Lock::Timeout=300"
# Try without `apt-get update` first: on a machine whose package lists are current it is enough.
$apt install -y chromium >/dev/null 2>&1 ||
  { $apt update >/dev/null 2>&1 && $apt install -y chromium >/dev/null 2>&1; } ||
  echo "could not install chromium: the browser tests will fail (see README, Dashboard)" >&2
exit 0
