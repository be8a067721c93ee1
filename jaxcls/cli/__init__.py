"""The command-line programs, one thin module each; `common.py` holds what they share.

| program | module |
|---|---|
| `jaxcls-train` (also `python run_train.py`) | train.py |
| `jaxcls-predict` | predict.py |
| `jaxcls-export` | export.py |
| `jaxcls-report` | report.py |
| `jaxcls-evaluate` | evaluate.py |
| `jaxcls-serve` | serve.py |
| `jaxcls-inspect` | inspect.py |
| `jaxcls-pretrained import` | pretrained.py |
| `jaxcls-benchmark NAME` | benchmark.py (the benchmarks themselves: jaxcls/benchmark/) |

Each `jaxcls-NAME` is also `python -m jaxcls.cli.NAME`, the one module form (for an
interpreter whose scripts are not on PATH). Programs import the library, never the
other way round: no module outside jaxcls/cli/ and jaxcls/benchmark/ imports this
package (tests/test_layout.py).
"""
