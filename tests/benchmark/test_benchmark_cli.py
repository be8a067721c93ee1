"""Every benchmark fails the jaxcls way on a bad flag: one `error:` line, status 2."""

import importlib
import os

import pytest

from jaxcls.benchmark import COMMANDS

NEEDS_TORCH = ("torch-resnet18", "conv-kernels")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_benchmark_rejects_an_unknown_flag_with_one_error_line(name, capsys):
  if name in NEEDS_TORCH:
    pytest.importorskip("torch")
  benchmark = importlib.import_module(COMMANDS[name])
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(["--no-such-flag"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err  # No usage block, no traceback.
  # Those with a required flag name it first; the others the unknown one.
  assert err.startswith(("error: unrecognized arguments: --no-such-flag",
                         "error: the following arguments are required: --config")), err
  assert err.strip().endswith(f"(see jaxcls-benchmark {name} --help)"), err


def test_benchmarks_find_the_recipes_where_they_start_their_children():
  from jaxcls.benchmark import REPO_ROOT
  assert os.path.isfile(os.path.join(REPO_ROOT, "configs", "demo.py"))
  assert os.path.isfile(os.path.join(REPO_ROOT, "jaxcls", "benchmark", "__init__.py"))
