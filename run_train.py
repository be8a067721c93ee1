"""Train a classifier: python run_train.py --config configs/demo.py --workdir /tmp/demo"""

from jaxcls.cli.train import cli

if __name__ == "__main__":
  cli()
