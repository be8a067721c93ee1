"""The command-line programs, one thin module each; `common.py` holds what they share.

| program | module |
|---|---|
| `python run_train.py`, `jaxcls-train` | train.py |
| `jaxcls-predict` | predict.py |
| `jaxcls-export` | export.py |
| `jaxcls-report` | report.py |
| `jaxcls-evaluate` | evaluate.py |
| `jaxcls-serve` | serve.py |
| `jaxcls-inspect` | inspect.py |
| `jaxcls-pretrained import` | pretrained.py |
| `python -m jaxcls.benchmark`, `jaxcls-benchmark` | benchmark.py |

Each is also `python -m jaxcls.cli.NAME`.
"""
