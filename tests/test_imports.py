"""The import graph of ``sparse_attention_jax``, ``pallas_kernels`` and ``train`` has no cycles.

Read from the source (AST), not by importing: an edge ``a -> b`` for every ``import`` of ``b`` in
``a``, at module level or inside a function. ``from p import name`` points at ``p.name`` when that
is a module, else at ``p``; importing a module of another package also runs that package's
``__init__`` (an edge to each such ancestor). Checked: no cycle between modules; no cycle between
packages (a package's ``__init__`` gathering the API of its own subpackages is containment, not a
dependency); the kernels do not import the library (the library calls them, lazily); the library
does not import the kernels when it is imported.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sparse_attention_jax", "pallas_kernels", "train")


def _modules() -> dict[str, tuple[str, bool]]:
  """Module name -> (path, is_package_init) for every ``.py`` file of :data:`PACKAGES`."""
  found = {}
  for top in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
      for f in filenames:
        if not f.endswith(".py"):
          continue
        if f == "__init__.py":
          found[rel] = (os.path.join(dirpath, f), True)
        else:
          found[f"{rel}.{f[:-3]}"] = (os.path.join(dirpath, f), False)
  return found


MODULES = _modules()


def _package(name: str) -> str:
  """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
  return name if MODULES[name][1] else name.rpartition(".")[0]


def _known(name: str) -> str | None:
  """The longest prefix of ``name`` that is one of :data:`MODULES`."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str) -> list[tuple[str, bool]]:
  """``(imported module, at module level)`` for every import in ``name``'s source."""
  path, is_init = MODULES[name]
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  top_level = {id(n) for n in tree.body}
  base = name if is_init else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if node.level:
        pkg = base.split(".")
        pkg = pkg[: len(pkg) - (node.level - 1)]
        mod = ".".join(pkg + ([mod] if mod else []))
      targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
    for t in targets:
      k = _known(t)
      if k is not None and k != name:
        out.append((k, id(node) in top_level))
        out += [(a, id(node) in top_level) for a in _ancestors(k) if a not in _ancestors(name)]
  return out


EDGES = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, on, stack, out = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_is_read():
  assert "sparse_attention_jax.ops.dispatch" in MODULES and "pallas_kernels" in MODULES
  assert ("sparse_attention_jax.ops.masked", True) in EDGES["sparse_attention_jax.ops.blocked"]


@pytest.mark.parametrize(
  "package",
  ["sparse_attention_jax", "train", "pallas_kernels"],
)
def test_no_cycle_between_modules(package):
  """No strongly connected component of the module graph touches ``package``."""
  graph = {a: {b for b, _ in edges} for a, edges in EDGES.items()}
  found = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
  assert found == []


def test_no_cycle_between_packages():
  graph: dict[str, set[str]] = {}
  for a, edges in EDGES.items():
    pa = _package(a)
    for b, _ in edges:
      pb = _package(b)
      contained = MODULES[a][1] and pb.startswith(pa + ".")  # __init__ gathering a subpackage
      if pb != pa and not contained:
        graph.setdefault(pa, set()).add(pb)
  assert _cycles(graph) == []


def test_the_library_does_not_import_the_kernels_at_import_time():
  top = [
    (a, b)
    for a, edges in EDGES.items()
    if a.startswith("sparse_attention_jax")
    for b, at_top in edges
    if at_top and b.startswith("pallas_kernels")
  ]
  assert top == []
  code = (
    "import sys, sparse_attention_jax, sparse_attention_jax.nn, sparse_attention_jax.ops; "
    "print(sorted(m for m in sys.modules if m.startswith('pallas_kernels')))"
  )
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
  )
  assert res.stdout.strip() == "[]", res.stdout


def test_the_kernels_do_not_import_the_library():
  found = [
    (a, b)
    for a, edges in EDGES.items()
    if a.startswith("pallas_kernels")
    for b, _ in edges
    if b.startswith("sparse_attention_jax")
  ]
  assert found == []
