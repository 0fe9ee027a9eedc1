"""The library's packages import only what the library needs (the training stack is an extra)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# Packages of the ``[train]`` extra that flax does not itself import (flax pulls in optax and yaml).
TRAIN_ONLY = ("orbax", "grain", "tqdm", "tensorboardX", "matplotlib", "tokenizers")


def test_importing_the_library_imports_no_training_package():
  code = (
    "import sys\n"
    "import sparse_attention_jax, sparse_attention_jax.nn, pallas_kernels\n"
    f"print(sorted(m for m in {TRAIN_ONLY!r} if m in sys.modules))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout
