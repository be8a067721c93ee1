"""jaxcls against PyTorch eager on this CPU, same model, same run: images/sec and ratio.

    jaxcls-benchmark compare-cpu [--rounds 3] [--steps 8] \
        [--variant NAME='XLA FLAGS' ...] [--env-variant NAME='KEY=VALUE ...' ...] \
        [--torch-env-variant NAME='KEY=VALUE ...' ...] [--jax-arg=--no-augment ...]

Runs, `--rounds` times and interleaved (so a load change on a shared machine hits both
alike), the jaxcls train step (`jaxcls-benchmark step --config
configs/catdog.py --config.model.name=resnet18 --config.batch_size=32`, 128 px, float32,
SGD momentum 0.9 + weight decay, dropout 0.4) and the same step in PyTorch
(`jaxcls-benchmark torch-resnet18`), each
in a fresh process. Prints one JSON object: every run, the median images/sec of each,
and jaxcls / PyTorch. `--variant` adds jaxcls runs under other XLA_FLAGS ("" = none;
"default" = what jaxcls sets by itself), to compare flags in the same interleaving;
`--env-variant` adds runs with extra environment variables, e.g. the step as it was
before jaxcls's CPU layers, XLA option and allocator setting: before='JAXCLS_CPU_LAYERS=0
JAXCLS_XLA_DEFAULTS=0 JAXCLS_ALLOCATOR_DEFAULTS=0'. `--torch-env-variant` does the same
for PyTorch, e.g. with the allocator setting jaxcls's command lines use:
hugepages='GLIBC_TUNABLES=glibc.malloc.hugetlb=1', with jaxcls / that run's
median printed too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from jaxcls.benchmark import REPO_ROOT
from jaxcls.cli import common

JAX_CMD = [sys.executable, "-m", "jaxcls.cli.benchmark", "step", "--config",
           os.path.join(REPO_ROOT, "configs", "catdog.py"), "--config.model.name=resnet18",
           "--config.batch_size=32", "--config.data.image_size=128"]
TORCH_CMD = [sys.executable, "-m", "jaxcls.cli.benchmark", "torch-resnet18",
             "--image-size", "128", "--batch-size", "32"]


def _run(cmd: list[str], env: dict) -> dict:
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def _env(xla_flags: str | None) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  if xla_flags is not None:  # None: jaxcls's own defaults apply.
    env["XLA_FLAGS"] = xla_flags
  return env


def _env_variant(item: str) -> tuple[str, dict]:
  name, _, assignments = item.partition("=")
  return name, dict(pair.split("=", 1) for pair in assignments.split())


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark compare-cpu",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME=XLA_FLAGS for an extra jaxcls run per round.")
  parser.add_argument("--env-variant", action="append", default=[],
                      help="NAME='KEY=VALUE KEY=VALUE' for an extra jaxcls run per round "
                           "with these environment variables, e.g. "
                           "before='JAXCLS_CPU_LAYERS=0 JAXCLS_XLA_DEFAULTS=0'.")
  parser.add_argument("--torch-env-variant", action="append", default=[],
                      help="NAME='KEY=VALUE ...' for an extra PyTorch run per round, "
                           "reported as pytorch_NAME.")
  parser.add_argument("--jax-arg", action="append", default=[],
                      help="Extra argument for the jaxcls step benchmark, e.g. --no-augment.")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
  variants = {"jaxcls": (None, {})}
  for item in args.variant:
    name, _, flags = item.partition("=")
    variants[name] = (None if flags == "default" else flags, {})
  for item in args.env_variant:
    name, assignments = _env_variant(item)
    variants[name] = (None, assignments)
  if args.no_torch and args.torch_env_variant:
    parser.error("--torch-env-variant needs PyTorch runs: drop --no-torch.")
  torch_variants = {} if args.no_torch else {"pytorch": {}}
  for item in args.torch_env_variant:
    name, assignments = _env_variant(item)
    torch_variants[f"pytorch_{name}"] = assignments
  clash = sorted(set(variants) & set(torch_variants))
  if clash:
    parser.error(f"variant names used twice: {', '.join(clash)}; rename one.")
  runs = {name: [] for name in [*variants, *torch_variants]}
  for round_index in range(args.rounds):
    for name, (flags, extra_env) in variants.items():
      result = _run(JAX_CMD + steps + args.jax_arg, {**_env(flags), **extra_env})
      runs[name].append(result)
      print(f"round {round_index} {name}: {result['step_images_per_sec']} img/s "
            f"({result.get('percent_of_peak')} % of matmul peak)", file=sys.stderr)
    for name, extra_env in torch_variants.items():
      result = _run(TORCH_CMD + steps, {**_env(None), **extra_env})
      runs[name].append(result)
      print(f"round {round_index} {name}: {result['step_images_per_sec']} img/s",
            file=sys.stderr)
  medians = {name: statistics.median(r["step_images_per_sec"] for r in rs)
             for name, rs in runs.items()}
  summary = {"median_images_per_sec": medians, "rounds": args.rounds,
             "load_average": os.getloadavg(), "runs": runs}
  if "pytorch" in medians:
    summary["ratio_jaxcls_over_pytorch"] = round(medians["jaxcls"] / medians["pytorch"], 3)
  for name in torch_variants:
    if name != "pytorch":
      summary[f"ratio_jaxcls_over_{name}"] = round(medians["jaxcls"] / medians[name], 3)
  print(json.dumps(summary))
  return 0
