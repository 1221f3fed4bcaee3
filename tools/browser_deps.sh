#!/usr/bin/env bash
# What `make browser` needs besides selenium (a test extra): Chromium, its chromedriver, and npm
# (tools/fetch_mathjax.sh: without it the book loads MathJax from a CDN, which the hermetic
# browser test cannot reach, so it cannot check the math).
# In CI (CI=true, running as root, apt-get present) it installs the missing Debian packages
# (chromium, chromium-driver, npm) and fails if that fails. Elsewhere it installs nothing: it says
# what is missing, and the test skips (or, without npm, skips the math checks) saying why.
set -uo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
missing=()
have chromium || have chromium-browser || have google-chrome || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
have npm || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ] && have apt-get; then
  echo "browser: installing ${missing[*]} (Debian packages) for tests/browser"
  start=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || {
    echo "browser: apt-get install ${missing[*]} failed" >&2; exit 1; }
  echo "[timing] browser deps (apt-get install ${missing[*]}): $(( $(date +%s) - start ))s"
  exit 0
fi
echo "browser: not installed: ${missing[*]}; tests/browser will say what it skips."
echo "browser: on Debian/Ubuntu: sudo apt-get install ${missing[*]} (with CI=true, as root, make browser does it)."
exit 0
