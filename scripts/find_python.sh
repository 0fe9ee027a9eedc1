#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (JAX >= 0.11 needs it), or fails with a message.
for c in "${PYTHON:-}" python3.12 python3.13 python3 \
         "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3 2>/dev/null | head -n1)"; do
  [ -n "$c" ] || continue
  p=$(command -v "$c" 2>/dev/null) || continue
  if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
    echo "$p"; exit 0
  fi
done
echo "no Python >= 3.12 found: install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
