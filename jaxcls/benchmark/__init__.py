"""Every throughput figure jaxcls measures, behind one entry point:

    jaxcls-benchmark NAME [ARGS]      (NAME --help for each one's flags)

| NAME | module | measures |
|---|---|---|
| `step` | step.py | the train step: compile time, FLOPs, images/sec, % of matmul peak |
| `loader` | loader.py | decoding, the step, and the step fed by the real loader |
| `predict` | predict.py | predict's cold start, warm latency and throughput |
| `inference` | inference.py | Predictor, jax.export file and ONNX Runtime side by side |
| `serve` | serve.py | the HTTP server: requests/s and p50/p99 latency at 1, 8, 32 clients |
| `compare-cpu` | compare_cpu.py | jaxcls against PyTorch eager on this CPU, same run |
| `torch-resnet18` | torch_resnet18.py | PyTorch's side of that comparison |
| `conv-kernels` | conv_kernels.py | ResNet-18's convolutions alone: XLA, oneDNN, PyTorch |
| `checkpoint` | checkpoint_overhead.py | step time with checkpoints off, async, sync |
| `report-speed` | report_speed.py | how long the report takes |
| `gpu` | gpu.py | the first accelerator run: ResNet-50 step, loader, flagship time to accuracy |

Each module has a `main(argv)`; the figures and when they were measured are in
`benchmarks/README.md`. Two scripts stay in `benchmarks/`: `gpu.sh` (the GPU session's
wrapper around `gpu`) and `pretrained_vs_pytorch.py`, which borrows the tests' PyTorch
reference models and weight servers, and so cannot be part of the installed package.
"""

import os

# The checkout (or site-packages) holding jaxcls: where the benchmarks find `configs/` and
# where their child processes start, so that `-m` finds this jaxcls first.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def uncached_environment() -> dict[str, str]:
  """This process's environment without the compilation-cache settings, for a child whose
  cold start is being measured."""
  return {k: v for k, v in os.environ.items()
          if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXCLS_COMPILATION_CACHE")}


COMMANDS = {
    "step": "jaxcls.benchmark.step",
    "loader": "jaxcls.benchmark.loader",
    "predict": "jaxcls.benchmark.predict",
    "inference": "jaxcls.benchmark.inference",
    "serve": "jaxcls.benchmark.serve",
    "compare-cpu": "jaxcls.benchmark.compare_cpu",
    "torch-resnet18": "jaxcls.benchmark.torch_resnet18",
    "conv-kernels": "jaxcls.benchmark.conv_kernels",
    "checkpoint": "jaxcls.benchmark.checkpoint_overhead",
    "report-speed": "jaxcls.benchmark.report_speed",
    "gpu": "jaxcls.benchmark.gpu",
}
