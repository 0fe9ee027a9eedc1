"""The output folder of a training run: what a previous run left there, and ``metrics.jsonl``.

A run folder (``train.output_dir``) holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``
and ``tensorboard/``. The training job calls :func:`previous_run` only after the config, the data
and the model are validated, and then:

* a fresh run into a folder holding a previous run refuses (nothing is deleted);
* ``--overwrite`` removes exactly the files of :func:`previous_run` (:func:`remove`);
* ``--resume`` keeps them and trims ``metrics.jsonl`` to the restored step
  (:func:`trim_metrics`), so re-run steps never appear twice, then records the eval loss of the
  restored model at that step (:func:`record_resume_eval`).

Other files in the folder (e.g. a launcher's log) are never touched.
"""

from __future__ import annotations

import json
import os
import shutil

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"


def previous_run(output_dir: str | os.PathLike) -> list[str]:
  """Names of the run files under ``output_dir`` (``config.yaml``, ``metrics.jsonl``, a
  non-empty ``checkpoints/`` or ``tensorboard/``); empty when there is no previous run."""
  output_dir = os.fspath(output_dir)
  found = []
  for name in (CONFIG, METRICS):
    if os.path.isfile(os.path.join(output_dir, name)):
      found.append(name)
  for name in (CHECKPOINTS, TENSORBOARD):
    path = os.path.join(output_dir, name)
    if os.path.isdir(path) and os.listdir(path):
      found.append(name + "/")
  return found


def remove(output_dir: str | os.PathLike) -> list[str]:
  """Deletes the run files of :func:`previous_run` (``--overwrite``); returns their names."""
  found = previous_run(output_dir)
  for name in found:
    path = os.path.join(os.fspath(output_dir), name.rstrip("/"))
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return found


def trim_metrics(path: str | os.PathLike, step: int) -> int:
  """Drops the events after ``step`` from a ``metrics.jsonl`` (a resume from ``step``).

  Lines that are not JSON objects with a ``step`` (e.g. the half-written last line of a killed
  run) are dropped too. The file is rewritten atomically (a temporary file, then a rename).

  Returns:
    The number of lines dropped (0 when the file does not exist).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        event = json.loads(line)
        keep = isinstance(event, dict) and int(event["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      elif line.strip():
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def record_resume_eval(path: str | os.PathLike, step: int, eval_loss: float) -> bool:
  """Appends ``{"step": step, "eval_loss": eval_loss, "resumed": true}`` to a ``metrics.jsonl``
  unless it already holds an eval event at ``step`` (a run that evaluated at the step it was
  saved at), so the resumed curve starts with a measured point. Returns whether it appended."""
  path = os.fspath(path)
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          event = json.loads(line)
        except ValueError:
          continue
        if isinstance(event, dict) and event.get("step") == step and "eval_loss" in event:
          return False
  with open(path, "a") as f:
    f.write(json.dumps({"step": step, "eval_loss": eval_loss, "resumed": True}) + "\n")
  return True
