"""Experiment tracking: callbacks `train_and_evaluate` calls, and Weights & Biases.

A callback is any object with these methods (all optional to act on, all called on
process 0 only):

- `on_step(step, metrics)`: every training step's `loss` and `accuracy`, delivered at
  log intervals (the loop fetches metrics from the devices once per interval);
- `on_epoch(epoch, metrics)`: the epoch's train means and validation results (the
  fields of `jaxcls.workdir.EpochMetrics`);
- `on_end(summary)`: the `RunSummary`.

`train.wandb_project` in the config adds `WandbCallback` (needs `pip install
'jaxcls[wandb]'`; `WANDB_MODE=offline` writes the run locally, `wandb sync` uploads it).
"""

from __future__ import annotations

import dataclasses

from jaxcls import config as config_lib
from jaxcls import distributed
from jaxcls.errors import JaxclsError


class Callback:
  """A no-op base: subclass and override what you need."""

  def on_step(self, step: int, metrics: dict) -> None:
    del step, metrics

  def on_epoch(self, epoch: int, metrics: dict) -> None:
    del epoch, metrics

  def on_end(self, summary) -> None:
    del summary


class WandbCallback(Callback):
  """Logs steps and epochs to a Weights & Biases run, with the config as its config."""

  def __init__(self, project: str, config, **init_kwargs):
    try:
      import wandb
    except ImportError:
      raise JaxclsError("train.wandb_project is set, but Weights & Biases is not "
                        "installed: pip install 'jaxcls[wandb]', or set "
                        "--config.train.wandb_project=''.") from None
    self._wandb = wandb
    self.run = wandb.init(project=project, config=config_lib.flatten(config),
                          **init_kwargs)

  def on_step(self, step: int, metrics: dict) -> None:
    self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

  def on_epoch(self, epoch: int, metrics: dict) -> None:
    values = {f"epoch/{k}": v for k, v in metrics.items() if v is not None}
    self.run.log({**values, "epoch": epoch}, step=metrics["step"])

  def on_end(self, summary) -> None:
    self.run.summary.update({"final_step": summary.final_step,
                             "stop_reason": summary.stop_reason})
    if summary.last_epoch is not None:
      self.run.summary.update(dataclasses.asdict(summary.last_epoch))
    self.run.finish()


def from_config(config) -> tuple[Callback, ...]:
  """The callbacks the config asks for (on process 0: the others log nothing)."""
  if config.train.wandb_project and distributed.is_main_process():
    return (WandbCallback(config.train.wandb_project, config),)
  return ()
