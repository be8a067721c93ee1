"""Metric writers: `metrics.jsonl` (one JSON object per line) and TensorBoard events.

Only process 0 writes. TensorBoard events come from tensorboardX, which needs no
TensorFlow: `tensorboard --logdir WORKDIR/tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value


class MetricWriter:
  """Appends rows to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               purge_after: int | None = None):
    """`purge_after`: a resumed run's step; rows logged after it are dropped (replayed)."""
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled and purge_after is not None:
      drop_rows_after(workdir, purge_after)
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # Imported only where events are written.
      purge_step = None if purge_after is None else purge_after + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

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

  def write_images(self, step: int, tag: str, images: np.ndarray) -> None:
    """Shows images [N, H, W, 3] (values in [0, 255]) in TensorBoard as one grid."""
    if self._tb is not None:
      self._tb.add_image(tag, image_grid(images), int(step), dataformats="HWC")

  def write_hparams(self, hparams: dict, progress) -> None:
    """TensorBoard's hyperparameter table: the config's scalar keys and the best
    validation result (a run of its own under tensorboard/hparams/)."""
    if self._tb is None or progress.best is None:
      return
    metrics = {"hparam/best_val_accuracy": progress.best.val_accuracy}
    last = progress.last_epoch
    if last is not None:
      metrics["hparam/last_val_loss"] = last.val_loss
      if last.val_ema_accuracy is not None:
        metrics["hparam/last_val_ema_accuracy"] = last.val_ema_accuracy
    self._tb.add_hparams(hparams, metrics, name="hparams", global_step=progress.best.step)

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


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles images [N, H, W, C] into one uint8 [rows·(H+pad)+pad, ..., C] picture.

  Values are rounded and clipped to [0, 255]: TensorBoard reads uint8 as pixel values
  (a float picture would be taken as [0, 1]). Gaps between tiles are black.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"image_grid needs images [N, H, W, C] with N >= 1, got shape "
                     f"{images.shape}.")
  count, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  grid = np.zeros((rows * (height + pad) + pad, columns * (width + pad) + pad, channels),
                  np.uint8)
  tiles = np.clip(np.rint(images.astype(np.float32)), 0, 255).astype(np.uint8)
  for i, tile in enumerate(tiles):
    top = pad + (i // columns) * (height + pad)
    left = pad + (i % columns) * (width + pad)
    grid[top:top + height, left:left + width] = tile
  return grid


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes rows with `step` > step from metrics.jsonl; returns how many went.

  A run resumed from the checkpoint at `step` logs the later steps again; without this,
  plots would show them twice. A line cut short by a killed run is dropped too. The
  file is replaced atomically.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("step", 0) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return 0
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)
  return len(lines) - len(kept)
