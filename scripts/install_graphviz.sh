#!/usr/bin/env bash
# Graphviz's `dot` draws tc's pictures (tc export --format svg/png). Install it where this machine allows
# it without asking (Debian/Ubuntu as root, or with password-less sudo); otherwise say in one line that
# svg pictures will be drawn by tc's own SVG writer (png needs dot). Never fails: `make demo` and
# `.ci/run` call it first and go on either way.
if command -v dot >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    sudo="none"
  fi
  if [ "$sudo" != none ] && { $sudo apt-get update -qq && $sudo apt-get install -y -qq graphviz; } >/dev/null 2>&1; then
    echo "installed Graphviz (apt-get install graphviz)" >&2
    exit 0
  fi
fi
echo "Graphviz's dot is not installed and could not be installed here: svg pictures are drawn by tc's own SVG writer" >&2
exit 0
