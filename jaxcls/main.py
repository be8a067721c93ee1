"""Moved: the training program is `jaxcls/cli/train.py` (`jaxcls-train`,
`python run_train.py`). This module keeps `python -m jaxcls.main` working until
jaxcls 0.3."""

if __name__ == "__main__":
  from jaxcls.cli.train import cli
  cli()
