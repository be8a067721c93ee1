"""`python -m jaxcls.benchmark NAME [ARGS]`: see `jaxcls/benchmark/__init__.py`."""

from jaxcls.cli.benchmark import cli

cli()
