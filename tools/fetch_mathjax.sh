#!/usr/bin/env bash
# Put a small local copy of MathJax 3 into _vendor/mathjax/ (git-ignored) for the book to serve
# from _static/mathjax/ (tools/book_assets.py wires it in), so math renders offline.
#
# The version is the one pinned in package.json / package-lock.json; `npm ci` fetches it into
# node_modules/ and only what the book needs is copied (about 2 MB, hence not committed):
#   es5/tex-chtml.js                  TeX input + CommonHTML output + menu, one file
#   es5/output/chtml/fonts/woff-v2/   the CommonHTML fonts
#   es5/input/tex/extensions/         TeX packages that MathJax autoloads on demand (\boldsymbol, \cancel, ...)
# Never fails the build: without npm (or the network) it says why and the book keeps MathJax's CDN.
set -uo pipefail
cd "$(dirname "$0")/.."

dest=_vendor/mathjax
want=$(sed -n 's/.*"mathjax": *"\([^"]*\)".*/\1/p' package.json)
if [ -f "$dest/tex-chtml.js" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "mathjax: npm not found, so the book loads MathJax $want from the CDN (math renders only online)."
  echo "mathjax: install Node.js + npm (Debian: apt-get install npm) and re-run 'make book' to serve it from the book."
  exit 0
fi
src=node_modules/mathjax/es5
if [ "$(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' node_modules/mathjax/package.json 2>/dev/null)" != "$want" ]; then
  if ! npm ci --no-audit --no-fund --ignore-scripts --fetch-retries=1 --loglevel=error; then
    echo "mathjax: 'npm ci' failed (offline?), so the book loads MathJax from the CDN (math renders only online)."
    exit 0
  fi
fi
tmp=$(mktemp -d _vendor.mathjax.XXXXXX) || exit 0
mkdir -p "$tmp/output/chtml/fonts" "$tmp/input/tex"
cp "$src/tex-chtml.js" "$tmp/" &&
  cp -r "$src/output/chtml/fonts/woff-v2" "$tmp/output/chtml/fonts/" &&
  cp -r "$src/input/tex/extensions" "$tmp/input/tex/" &&
  cp node_modules/mathjax/LICENSE "$tmp/" &&
  echo "$want" > "$tmp/VERSION" || { rm -rf "$tmp"; echo "mathjax: copy failed, using the CDN"; exit 0; }
mkdir -p _vendor && rm -rf "$dest" && mv "$tmp" "$dest"
echo "mathjax: MathJax $want copied to $dest ($(du -sh "$dest" | cut -f1)), served from _static/mathjax/"
