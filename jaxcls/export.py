"""Moved: the library is `jaxcls.serve.export`, the program `jaxcls-export`
(`jaxcls/cli/export.py`). This module keeps `python -m jaxcls.export` working until
jaxcls 0.3."""

if __name__ == "__main__":
  from jaxcls.cli.export import cli
  cli()
