"""`python -m jaxcls.serve`, the same program as jaxcls-serve (jaxcls/cli/serve.py)."""

from jaxcls.cli.serve import cli

cli()
