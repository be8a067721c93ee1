"""What an accelerator would wait for, kept off it: each program compiled once, the FLOP
count compiled for the host's CPU, the finiteness check on the devices, the run's key
placed on the devices once, the validation images decoded once."""

import collections
import functools

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxcls import parallel, steps, train
from jaxcls.data import cache
from jaxcls.models import create_model
from model_utils import make_batch, make_state, model_config

LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # One per program lowered.


def _counted(fn, counts: collections.Counter, name: str):
  """`fn`, counting its traces: a pmapped function is traced once per compilation."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    counts[name] += 1
    return fn(*args, **kwargs)
  return wrapper


@pytest.mark.slow
def test_two_epochs_compile_each_program_once_and_nothing_after_the_first(
    shapes_dir, tmp_path, monkeypatch):
  """A recompile (a changed shape, dtype, weak type or sharding between steps) would
  trace a step again, or lower a program during the second epoch."""
  traces = collections.Counter()
  monkeypatch.setattr(steps, "train_step", _counted(steps.train_step, traces, "train"))
  monkeypatch.setattr(steps, "eval_step", _counted(steps.eval_step, traces, "eval"))
  monkeypatch.setattr(train, "_finite_everywhere",
                      _counted(train._finite_everywhere, traces, "finite"))
  lowered, saves = [], []

  def listen(event, secs, **kwargs):
    del secs
    if event == LOWERED:
      lowered.append(kwargs.get("fun_name"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  save = train._save

  def save_and_mark(*args, **kwargs):
    save(*args, **kwargs)
    saves.append(len(lowered))
  monkeypatch.setattr(train, "_save", save_and_mark)
  config = tiny_config(f"folder:{shapes_dir}", num_epochs=2)
  config.checkpoint.every_steps = 0  # Saved at the two epoch ends only.
  try:
    _, summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert summary.final_step == 12 and summary.stop_reason == "finished"
  assert traces == {"train": 1, "eval": 1, "finite": 1}
  assert len(saves) == 2 and lowered[saves[0]:] == []  # The whole second epoch.


def test_the_replicated_key_trains_exactly_as_one_key_did():
  """Step 0 on 8 devices with a flip and a rotation: the draws come from the key."""
  config = model_config("cnn")
  devices = jax.local_devices()
  state, batch, key = make_state(config, 3, 16), make_batch(8, 2, 16, 3), steps.root_key(1)
  one_key = jax.pmap(functools.partial(steps.train_step, options=steps.step_options(config)),
                     axis_name=parallel.AXIS, devices=devices, in_axes=(0, 0, None))
  before = jax.device_get(one_key(parallel.replicate(state, devices), batch, key))
  now = jax.device_get(train.pmapped_train_step(config, devices)(
      parallel.replicate(state, devices), batch, parallel.replicate(key, devices)))
  leaves = lambda out: jax.tree.leaves((out[0].params, out[0].batch_stats,  # noqa: E731
                                        out[0].opt_state, out[1]))
  assert [x.tobytes() for x in leaves(now)] == [x.tobytes() for x in leaves(before)]
  assert not np.array_equal(now[0].params["head"]["kernel"][0], state.params["head"]["kernel"])


def test_the_finiteness_check_runs_on_the_devices_and_sees_every_copy():
  devices = jax.local_devices()
  finite = parallel.pmap(train._finite_everywhere, devices)
  params = {"w": np.ones((8, 3), np.float32)}
  stats = {"mean": np.zeros((8, 2), np.float32), "count": np.full((8,), 7, np.int32)}
  assert np.asarray(finite(params, stats)).tolist() == [1] * 8
  stats["mean"][5, 1] = np.inf  # One device's copy only: every device says so.
  assert np.asarray(finite(params, stats)).tolist() == [0] * 8
  stats["mean"][5, 1] = 0.0
  params["w"][2, 0] = np.nan
  assert np.asarray(finite(params, stats)).tolist() == [0] * 8


def test_flops_are_counted_on_the_host_cpu_and_equal_the_device_count(monkeypatch):
  model = create_model(model_config("cnn").model, 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.uint8)
  on_device = steps.compiled_flops(jax.jit(functools.partial(model.apply, train=False))
                                   .lower(shapes, images).compile())
  stages = []
  count = steps.compiled_flops
  monkeypatch.setattr(steps, "compiled_flops", lambda stage: stages.append(stage) or
                      count(stage))
  host = jax.local_devices()[7]  # Stands for the CPU beside an accelerator.
  monkeypatch.setattr(steps, "_host_cpu", lambda: host)
  assert steps.forward_flops_per_image(model, shapes, 16) == on_device > 0
  compiled = stages[-1]
  assert isinstance(compiled, jax.stages.Compiled)
  assert {d for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set} == {host}
  # Without a CPU backend: the lowered program's count, compiled for nothing.
  monkeypatch.setattr(steps, "_host_cpu", lambda: None)
  lowered = steps.forward_flops_per_image(model, shapes, 16)
  assert isinstance(stages[-1], jax.stages.Lowered)
  assert lowered == pytest.approx(on_device, rel=0.01)


def test_validation_images_stay_decoded_in_memory_when_they_fit(shapes_dir, tmp_path):
  config = tiny_config(f"folder:{shapes_dir}")
  dataset = train._load_data(config, str(tmp_path))
  assert isinstance(dataset.val, cache.CachedSource)
  assert not isinstance(dataset.train, cache.CachedSource)  # data.cache="none".
  source = dataset.val.source
  size = len(source) * 16 * 16 * 3
  assert cache.kept_in_memory_if_fits(source, 16, budget=size - 1) is source
  assert isinstance(cache.kept_in_memory_if_fits(source, 16, budget=size),
                    cache.CachedSource)
  on_disk = train._load_data(tiny_config(f"folder:{shapes_dir}", **{"data.cache": "disk"}),
                             str(tmp_path))
  assert isinstance(on_disk.val.images, np.memmap)  # data.cache="disk" stays on disk.
