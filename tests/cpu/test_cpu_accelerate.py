"""jaxcls.cpu applied from outside: a whole pmapped train step gives plain flax's results
to float32 rounding; any plain-flax model gets it, a user's own included; without the
package jaxcls still trains; importing jaxcls sets no process option."""

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from jaxcls import cpu, models, parallel, steps
from jaxcls.cpu import onednn
from model_utils import make_batch, make_state, model_config
from numerics import agreement, assert_normwise_close


def _train_step(devices):
  # A new function each time: JAX would reuse a trace of the same one.
  return jax.pmap(functools.partial(steps.train_step, options=steps.StepOptions()),
                  axis_name=parallel.AXIS, devices=devices, in_axes=(0, 0, None))


def _one_step(state, batch, accelerated: bool):
  """(loss, parameter updates, batch-statistics changes, lowered and compiled text)."""
  devices = jax.local_devices()
  args = (parallel.replicate(state, devices), batch, steps.root_key(1))
  with contextlib.nullcontext() if accelerated else cpu.disabled():
    lowered = _train_step(devices).lower(*args)
    compiled = lowered.compile()
  new, metrics = jax.device_get(compiled(*args))
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0], np.float64), tree)
  moved = lambda new, old: jax.tree.map(lambda a, b: a - np.asarray(b, np.float64), new, old)
  return (metrics["loss"][0], moved(first(new.params), state.params),
          moved(first(new.batch_stats), state.batch_stats),
          lowered.as_text() + compiled.as_text())


@pytest.mark.slow
@pytest.mark.parametrize("name, weight_layers, first_layer_pixels", [
    ("cnn", 5, 32 * 32),        # 4 convolutions and the head; SAME padding at 32 px.
    ("resnet18", 18, 16 * 16),  # The longest path; the stem halves 32 px.
])
def test_pmapped_train_step_matches_plain_flax_on_8_devices(name, weight_layers,
                                                            first_layer_pixels):
  """One step on 8 devices calling oneDNN at once, against the same step with flax's
  layers and XLA's convolutions, compared where the comparison is well conditioned:
  the loss, the batch statistics' update and the head's update (forward quantities),
  and for the CNN every parameter's update.

  ResNet-18's backbone updates at random initialization are not well conditioned:
  against float64 (measured 2026-12-02 at 32 px, batch 32), flax's own layers and
  jaxcls's each missed by 1e-3 to 1e-2 on some inputs and by 1e-5 on others, as ReLU
  and max-pool kinks flip with rounding; the layer tests check those gradients.
  """
  assert jax.local_device_count() == 8
  state = make_state(model_config(name), num_classes=3, image_size=32)
  batch = make_batch(8, 4, 32, 3)  # 4 per device: 32 images, normalized together.
  (our_loss, ours, our_stats, text), (their_loss, theirs, their_stats, plain) = (
      _one_step(state, batch, True), _one_step(state, batch, False))
  assert cpu.fast_convolutions_in(text) == onednn.available()
  assert not cpu.fast_convolutions_in(plain) and "select_and_scatter" in plain
  assert "select_and_scatter" not in text  # jaxcls.cpu's max-pool gradient instead.
  longest = 32 * first_layer_pixels  # The first layer's batch statistics and dw.
  forward = agreement(weight_layers, longest)
  assert abs(our_loss - their_loss) <= forward * abs(their_loss)
  assert_normwise_close(our_stats, their_stats, forward, "batch statistics")
  assert_normwise_close(ours["head"], theirs["head"], forward, "head update")
  if name == "cnn":  # Forward and backward through every layer.
    assert_normwise_close(ours, theirs, agreement(2 * weight_layers, longest), "update")
  assert np.abs(ours["head"]["kernel"]).max() > 0


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_models_have_flax_s_variables_with_or_without_the_cpu_layers(name):
  model = models.create_model(model_config(name).model, 2)
  images = jnp.zeros((1, 32, 32, 3))
  ours = jax.eval_shape(cpu.accelerate(model.init), jax.random.key(0), images)
  theirs = jax.eval_shape(model.init, jax.random.key(0), images)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.map(lambda s: s.shape, ours) == jax.tree.map(lambda s: s.shape, theirs)


def _handler_calls(text: str) -> dict[str, int]:
  return {target: text.count(f'custom_call_target="{cpu.ONEDNN_TARGET_PREFIX}{target}"')
          for target in onednn.TARGETS}


@pytest.mark.skipif(not onednn.available(), reason="oneDNN unavailable")
def test_every_convolution_of_a_model_runs_in_onednn_unless_disabled(monkeypatch):
  config = model_config("cnn").model
  model = models.create_model(config, 2)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)

  def compiled_gradient():
    apply = cpu.accelerate(model.apply)

    def loss(params, x):
      logits, _ = apply({**variables, "params": params}, x, train=True,
                        mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
      return jnp.sum(logits)
    return jax.jit(jax.grad(loss)).lower(variables["params"],
                                         jnp.ones((2, 16, 16, 3))).compile().as_text()

  convolutions = 2 * len(config.widths)  # Two per block.
  # The first convolution's input is the image: its input gradient is dropped.
  assert _handler_calls(compiled_gradient()) == {
      "forward": convolutions, "backward_data": convolutions - 1,
      "backward_weights": convolutions}
  with cpu.disabled():
    assert sum(_handler_calls(compiled_gradient()).values()) == 0
  monkeypatch.setenv("JAXCLS_CPU_LAYERS", "0")
  assert sum(_handler_calls(compiled_gradient()).values()) == 0


class _UserNet(nn.Module):
  """A backbone as a user writes it: flax's own layers, nothing of jaxcls."""
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train,
                             axis_name=self.axis_name if train else None)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return jnp.mean(nn.Conv(16, (3, 3), strides=(2, 2))(x), axis=(1, 2))


@pytest.mark.skipif(not onednn.available(), reason="oneDNN unavailable")
def test_a_registered_user_model_gets_the_cpu_layers(monkeypatch):
  monkeypatch.setitem(models.BACKBONES, "user_net",
                      lambda model_config, dtype, axis_name: _UserNet(axis_name))
  config = model_config("user_net")
  model = models.create_model(config.model, 2, axis_name=parallel.AXIS)
  state = steps.create_train_state(config, model, steps.root_key(0), 10)
  devices = jax.local_devices()[:2]
  lowered = _train_step(devices).lower(parallel.replicate(state, devices),
                                       make_batch(2, 2, 16, 2), steps.root_key(1))
  assert _handler_calls(lowered.compile().as_text()) == {
      "forward": 2, "backward_data": 1, "backward_weights": 2}
  assert "select_and_scatter" not in lowered.as_text()  # jaxcls.cpu's max-pool gradient.


@pytest.mark.slow
@pytest.mark.skipif(not onednn.available(), reason="oneDNN unavailable")
def test_a_user_model_in_its_own_config_file_steps_with_onednn():
  """examples/my_model.py: a plain-flax backbone registered in the user's recipe file.
  (tests/test_own_model.py trains it and runs every program on its workdir.)"""
  recipe = os.path.join(ROOT, "examples", "my_model.py")
  env = {**os.environ, "PYTHONPATH": ROOT}
  measured = subprocess.run([sys.executable, "-m", "jaxcls.cli.benchmark", "step", "--config",
                             recipe, "--steps", "1", "--warmup", "1"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert measured.returncode == 0, measured.stderr[-3000:]
  result = json.loads(measured.stdout.strip().splitlines()[-1])
  assert result["model"] == "tiny_net" and result["cpu_fast_convolutions"] is True


@pytest.mark.slow
def test_without_the_cpu_package_jaxcls_still_trains(tmp_path, shapes_dir):
  """Delete jaxcls/cpu/ and its two call sites (docs/cpu.md): a working, slower jaxcls."""
  copy = tmp_path / "jaxcls"
  shutil.copytree(os.path.join(ROOT, "jaxcls"), copy,
                  ignore=shutil.ignore_patterns("cpu", "__pycache__"))
  steps_file, common_file = copy / "steps.py", copy / "cli" / "common.py"
  steps_text = steps_file.read_text()
  assert steps_text.count("cpu.accelerate(model.apply)") == 1
  steps_file.write_text(steps_text.replace("cpu.accelerate(model.apply)", "model.apply")
                        .replace("from jaxcls import cpu, optim", "from jaxcls import optim"))
  common_text = common_file.read_text()
  call = ("  from jaxcls.cpu.process import configure_process as configure\n"
          "  configure(tune_allocator=tune_allocator)\n")
  assert common_text.count(call) == 1
  common_file.write_text(common_text.replace(call, "  del tune_allocator\n"))
  code = textwrap.dedent(f"""
      import jaxcls, os
      from jaxcls import train
      from jaxcls.config import base_config
      assert not os.path.exists(os.path.join(os.path.dirname(jaxcls.__file__), "cpu"))
      config = base_config()
      config.data.source = "folder:{shapes_dir}"
      config.data.image_size = 16
      config.model.widths = (8, 16)
      config.batch_size, config.num_epochs = 16, 1
      config.train.progress_bar, config.train.log_images = False, 0
      _, summary = train.train_and_evaluate(config, "{tmp_path / 'w'}")
      print("trained", summary.final_step, summary.last_epoch.val_accuracy)
  """)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.search(r"^trained 6 \d\.\d+$", done.stdout, re.M), done.stdout


@pytest.mark.slow
def test_importing_jaxcls_sets_no_process_option():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "JAXCLS_XLA_DEFAULTS")}
  # JAX sets a few variables when it loads: import it first, so that only jaxcls's own
  # changes (by any of its modules, and by a CPU computation) would show.
  code = textwrap.dedent("""
      import importlib, json, os, pkgutil
      import jax, jaxcls
      before = dict(os.environ)
      skip = ("__main__", "conv_kernels", "torch_resnet18")  # The last two need torch.
      for module in pkgutil.walk_packages(jaxcls.__path__, "jaxcls."):
        if not module.name.endswith(skip):
          importlib.import_module(module.name)
      jax.numpy.ones(1).block_until_ready()
      print(json.dumps(sorted(k for k in set(before) | set(os.environ)
                              if before.get(k) != os.environ.get(k))))
  """)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT).stdout
  assert json.loads(out.strip().splitlines()[-1]) == []
