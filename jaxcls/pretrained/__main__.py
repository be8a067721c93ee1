"""`python -m jaxcls.pretrained`, kept for one release: the program is jaxcls-pretrained."""

from jaxcls.cli.pretrained import cli

cli()
