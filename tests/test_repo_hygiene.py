"""The tracked tree speaks of the project alone and its references resolve.

Greps every text file of ``git ls-files`` (binary files and the ``results/`` archives are
skipped) for

* absolute machine paths (under the work, root and home trees of a development machine);
* wording about the process that produced the code rather than the code: a numbered session or
  issue (public issue links such as ``#123`` are fine) and machines lent for the work;
* references that do not resolve: ``*.md`` file names anywhere (URLs excluded; file names that
  scripts write, ``GENERATED``, are allowed), repo-relative paths (``docs/x.md``,
  ``benchmarks/x.py``, ``tests/.../x.py``, ...) inside backticks or Markdown link targets, and
  the names of design notes that live outside the repository (``OUTSIDE_DOCS``; the repository's
  own are ``docs/algorithms.md``, ``docs/performance.md`` and ``docs/kernels.md``).

Each failure lists ``file:line: what``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)

SKIP_DIRS = ("results/",)
GENERATED = frozenset({"summary.md"})  # written by benchmarks/multi_device_run.py
OUTSIDE_DOCS = re.compile(
  r"\b(?:ALGORITHMS|PERFORMANCE|JAX_NOTES|KERNEL_DESIGN)(?:\.md)?\b|\bSTYLE\.md\b"
)
TOP_DIRS = (
  "benchmarks",
  "configs",
  "docs",
  "pallas_kernels",
  "results",
  "scripts",
  "sparse_attention_jax",
  "tests",
  "train",
)
PATH_EXTS = ("py", "md", "yaml", "yml", "sh", "json", "png", "toml", "txt", "xz", "cfg")

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
MACHINE_PATH = re.compile(r"(?<![\w.:/~$-])/(?:work|root)/|(?<![\w.:/~$-])/home/[a-z_][\w.-]*/")
WORDING = re.compile(r"\bsessions?\s+\d+|\bissues?\s+\d+|\blent\s+machines?\b", re.IGNORECASE)
MD_REF = re.compile(r"(?<![\w/.$-])((?:\.{1,2}/)?[\w][\w./-]*\.md)\b")
BACKTICK = re.compile(r"`+([^`]+)`+")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
_DIRS, _EXTS = "|".join(TOP_DIRS), "|".join(PATH_EXTS)
REPO_PATH = re.compile(rf"(?<![\w./$-])((?:\.{{1,2}}/)*(?:{_DIRS})/[\w./-]*?\.(?:{_EXTS}))(?!\w)")


def _git_files() -> list[str] | None:
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return [f for f in out.decode("utf-8", "replace").split("\0") if f]


@functools.lru_cache(maxsize=1)
def _tree() -> tuple[tuple[str, ...], frozenset[str], frozenset[str]]:
  """``(files, paths, basenames)`` of the tracked tree; ``paths`` also holds every folder."""
  files = _git_files()
  if files is None:
    pytest.skip("not a git checkout (git ls-files failed)")
  paths = set(files)
  for f in files:
    parts = f.split("/")
    for i in range(1, len(parts)):
      paths.add("/".join(parts[:i]))
  return tuple(files), frozenset(paths), frozenset(os.path.basename(f) for f in files)


def _text_files() -> list[tuple[str, list[str]]]:
  files, _, _ = _tree()
  out = []
  for f in files:
    if f == SELF or f.startswith(SKIP_DIRS):
      continue
    path = os.path.join(ROOT, f)
    if not os.path.isfile(path):  # deleted in the work tree, not yet in the index
      continue
    with open(path, "rb") as fh:
      data = fh.read()
    if b"\0" in data[:8192]:
      continue
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    out.append((f, text.splitlines()))
  return out


def _resolves(ref: str, src: str) -> bool:
  """A reference from file ``src`` names a tracked file or folder (from the root or ``src``'s
  folder); a bare file name may also name a tracked file anywhere."""
  _, paths, basenames = _tree()
  ref = ref.split("#", 1)[0].split("::", 1)[0].rstrip("/")
  if not ref:
    return True
  for base in ("", os.path.dirname(src)):
    cand = os.path.normpath(os.path.join(base, ref))
    if cand in paths:
      return True
  return "/" not in ref and ref in basenames


def _scan(line: str, src: str) -> list[str]:
  problems = []
  bare = URL.sub(" ", line)
  if m := MACHINE_PATH.search(bare):
    problems.append(f"absolute machine path {m.group(0)!r}")
  if m := WORDING.search(bare):
    problems.append(f"process wording {m.group(0)!r}")
  if m := OUTSIDE_DOCS.search(bare):
    problems.append(f"reference to a document outside the repository: {m.group(0)!r}")
  refs = {m.group(1) for m in MD_REF.finditer(bare)}
  refs = {r for r in refs if r not in GENERATED and not OUTSIDE_DOCS.fullmatch(r)}
  for span in BACKTICK.findall(bare) + MD_LINK.findall(bare):
    refs.update(m.group(1) for m in REPO_PATH.finditer(span))
  for ref in sorted(refs):
    if not _resolves(ref, src):
      problems.append(f"reference to a file not in the tree: {ref!r}")
  return problems


def find_problems() -> list[str]:
  """``file:line: problem`` for every finding in the tracked tree."""
  out = []
  for f, lines in _text_files():
    for i, line in enumerate(lines, 1):
      out.extend(f"{f}:{i}: {p}" for p in _scan(line, f))
  return out


@pytest.mark.parametrize(
  "line, expected",
  [
    # Built from pieces so that this file does not itself carry the patterns it looks for.
    ("see /" + "work/main/README.md", "absolute machine path"),
    ("cd /" + "root/x", "absolute machine path"),
    ("open('/" + "home/alice/data')", "absolute machine path"),
    ("measured in Sess" + "ion 16", "process wording"),
    ("done (iss" + "ue 7)", "process wording"),
    ("notes for a le" + "nt machine", "process wording"),
    ("see `docs/nowhere.md`", "not in the tree"),
    ("run `python3 benchmarks/nowhere.py --x`", "not in the tree"),
    ("[x](docs/missing.md)", "not in the tree"),
    ("as in JAX_NOTES §2.4", "outside the repository"),
    ("the targets of PERFORMANCE.md", "outside the repository"),
  ],
)
def test_patterns_flag(line, expected):
  problems = _scan(line, "README.md")
  assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
  "line",
  [
    "jax.lax.top_k and jax.nn.dot_product_attention",
    "https://github.com/fla-org/flash-linear-attention/blob/main/README.md",
    "/".join(["https://example.org", "work", "root", "home", "user", ""]),  # a URL, not a path
    "fla-org/native-sparse-attention issue #11 and PR #574",
    "writes runs/" + "work/x and $OUT/check.json, /tmp/x",
    "see `docs/algorithms.md` §2.4 and [the page](docs/performance.md#targets)",
    "`train/sharding.py::RULES` and `configs/*.yaml` and `runs/tiny/checkpoints/300`",
    "raw files in `results/decode.tar.xz`; writes summary.md and `$OUT/summary.md`",
    '`jax.nn.dot_product_attention(implementation="cudnn")` performance and style',
  ],
)
def test_patterns_pass(line):
  assert _scan(line, "README.md") == []


def test_tracked_tree_is_clean():
  problems = find_problems()
  assert not problems, f"{len(problems)} finding(s):\n" + "\n".join(problems)
