"""Metric writers: `metrics.jsonl` (one JSON object per line) and TensorBoard events.

Only process 0 writes. TensorBoard events come from tensorboardX, which needs no
TensorFlow: `tensorboard --logdir WORKDIR/tensorboard`.
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value


class MetricWriter:
  """Appends rows to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # Imported only where events are written.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict[str, Any], **extra: Any) -> dict:
    row = {"step": int(step), "split": split, **extra,
           **{k: _plain(v) for k, v in values.items()}}
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        value = _plain(value)
        if isinstance(value, (int, float)):
          self._tb.add_scalar(f"{split}/{key}", value, int(step))
    return row

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
