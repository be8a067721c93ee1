"""The optimizer: schedules, decay masks, clipping, nesterov, freezing and per-group rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import optim
from jaxcls.config import ConfigError, base_config, validate


def optim_config(**overrides):
  config = base_config().optim
  config.weight_decay = 0.0
  config.momentum = 0.0
  config.learning_rate = 0.1
  config.schedule = "constant"
  for key, value in overrides.items():
    config[key] = value
  return config


def params():
  return {"backbone": {"conv": {"kernel": jnp.full((2, 2), 2.0)},
                       "bn": {"scale": jnp.ones((2,)), "bias": jnp.full((2,), 3.0)}},
          "head": {"kernel": jnp.full((2, 3), 1.0), "bias": jnp.full((3,), 1.0)}}


def ones_like(tree):
  return jax.tree.map(jnp.ones_like, tree)


def run(tx, grads_per_step, p=None):
  """Applies `tx` for each gradient tree in turn; returns the list of updates."""
  p = params() if p is None else p
  state = tx.init(p)
  updates = []
  for grads in grads_per_step:
    u, state = tx.update(grads, state, p)
    updates.append(jax.device_get(u))
  return updates


def test_step_schedule_decays_at_the_given_epochs_after_warmup():
  config = optim_config(schedule="step", step_epochs=(2, 3), step_factor=0.1,
                        warmup_epochs=1.0)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, num_epochs=4)
  lrs = [float(schedule(s)) for s in (0, 5, 10, 19, 20, 29, 30, 39)]
  np.testing.assert_allclose(lrs, [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
                             rtol=1e-5)


def test_cosine_schedule_reaches_zero_at_the_end():
  schedule = optim.learning_rate_schedule(optim_config(schedule="cosine"), 10, 2)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(10)) == pytest.approx(0.05, rel=1e-5)
  assert float(schedule(20)) == pytest.approx(0.0, abs=1e-8)


def test_weight_decay_hits_kernels_only_by_default_and_is_configurable():
  zero = jax.tree.map(jnp.zeros_like, params())
  tx = optim.create_optimizer(optim_config(weight_decay=0.5), 1, 1)
  (u,) = run(tx, [zero])
  np.testing.assert_allclose(u["backbone"]["conv"]["kernel"], -0.1 * 0.5 * 2.0)
  np.testing.assert_array_equal(u["backbone"]["bn"]["bias"], 0.0)
  np.testing.assert_array_equal(u["backbone"]["bn"]["scale"], 0.0)
  np.testing.assert_array_equal(u["head"]["bias"], 0.0)
  tx = optim.create_optimizer(
      optim_config(weight_decay=0.5, decay_leaves=("kernel", "bias")), 1, 1)
  (u,) = run(tx, [zero])
  np.testing.assert_allclose(u["backbone"]["bn"]["bias"], -0.1 * 0.5 * 3.0)
  np.testing.assert_array_equal(u["backbone"]["bn"]["scale"], 0.0)


def test_grad_clip_norm_bounds_the_global_norm():
  grads = jax.tree.map(lambda x: jnp.full_like(x, 10.0), params())
  (u,) = run(optim.create_optimizer(optim_config(grad_clip_norm=1.0), 1, 1), [grads])
  norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(u)))
  assert norm == pytest.approx(0.1 * 1.0, rel=1e-5)


def test_nesterov_looks_ahead():
  g = ones_like(params())
  plain = run(optim.create_optimizer(optim_config(momentum=0.9), 1, 1), [g, g])
  ahead = run(optim.create_optimizer(optim_config(momentum=0.9, nesterov=True), 1, 1),
              [g, g])
  # Momentum trace after two steps: 1.9. Plain uses it; nesterov uses g + 0.9 * 1.9.
  assert float(plain[1]["head"]["bias"][0]) == pytest.approx(-0.1 * 1.9)
  assert float(ahead[1]["head"]["bias"][0]) == pytest.approx(-0.1 * (1 + 0.9 * 1.9))


def test_frozen_backbone_gets_exact_zero_updates_until_unfrozen():
  config = optim_config(freeze="backbone", backbone_lr_mult=0.1, momentum=0.9,
                        weight_decay=0.5)
  tx = optim.create_optimizer(config, 1, 10, frozen_for=2)
  g = ones_like(params())
  updates = run(tx, [g, g, g])
  for u in updates[:2]:
    for leaf in jax.tree.leaves(u["backbone"]):
      assert np.all(leaf == 0.0)
    assert np.all(u["head"]["bias"] != 0.0)
  # Unfrozen at step 2 with a clean momentum buffer, at 0.1 × the rate.
  np.testing.assert_allclose(updates[2]["backbone"]["bn"]["bias"], -0.01 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates[2]["backbone"]["conv"]["kernel"],
                             -0.01 * (1.0 + 0.5 * 2.0), rtol=1e-6)


def test_frozen_for_the_whole_run_by_default():
  config = base_config()
  config.optim.freeze = "backbone"
  assert optim.frozen_steps(config, 10) >= 2**31 - 1
  config.train.unfreeze_after_epochs = 3
  assert optim.frozen_steps(config, 10) == 30
  config.optim.freeze = "none"
  config.train.unfreeze_after_epochs = 0
  assert optim.frozen_steps(config, 10) == 0


def test_backbone_lr_mult_scales_backbone_updates_and_follows_the_schedule():
  config = optim_config(backbone_lr_mult=0.25, schedule="cosine")
  tx = optim.create_optimizer(config, 2, 1)  # Two steps: rates 0.1 then 0.05.
  updates = run(tx, [ones_like(params())] * 2)
  for u, lr in zip(updates, (0.1, 0.05)):
    np.testing.assert_allclose(u["head"]["bias"], -lr, rtol=1e-5)
    np.testing.assert_allclose(u["backbone"]["bn"]["bias"], -0.25 * lr, rtol=1e-5)


@pytest.mark.parametrize("key, value, words", [
    ("optim.schedule", "linear", "'step'"),
    ("optim.freeze", "head", "'backbone'"),
    ("train.label_smoothing", 1.0, "[0, 1)"),
    ("model.head_hidden", (0,), "positive integer"),
    ("train.unfreeze_after_epochs", 2, "optim.freeze='backbone'"),
])
def test_config_rejects_bad_recipe_values(key, value, words):
  config = base_config()
  config.data.source = "generated:shapes"
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert key in str(e.value) and words in str(e.value)


def test_step_schedule_needs_epochs():
  config = base_config()
  config.data.source = "generated:shapes"
  config.optim.schedule = "step"
  with pytest.raises(ConfigError, match="optim.step_epochs"):
    validate(config)


ADAM_FLOAT32 = 2.0 ** -24 / 0.001  # 1 − β₂ = 0.001 in float32, as a relative error.


def test_adamw_takes_normalized_steps_and_decouples_the_weight_decay():
  """Adam's first step is −lr·g/(|g| + eps) whatever the gradient's size; AdamW then
  takes lr·wd·w off the decayed leaves (kernels), not off biases or scales. Adam's bias
  correction divides by 1 − β₂ = 0.001, which float32 holds to 2^-24/0.001 ≈ 6e-5
  relative: the bound of these comparisons."""
  config = optim_config(name="adamw", learning_rate=0.01, weight_decay=0.5, eps=1e-8)
  tx = optim.create_optimizer(config, steps_per_epoch=10, num_epochs=1)
  grads = jax.tree.map(lambda x: 4.0 * jnp.ones_like(x), params())
  (u,) = run(tx, [grads])
  np.testing.assert_allclose(u["head"]["bias"], -0.01, rtol=ADAM_FLOAT32)  # Not decayed.
  np.testing.assert_allclose(u["backbone"]["bn"]["scale"], -0.01, rtol=ADAM_FLOAT32)
  np.testing.assert_allclose(u["backbone"]["conv"]["kernel"], -0.01 - 0.01 * 0.5 * 2.0,
                             rtol=ADAM_FLOAT32)
  np.testing.assert_allclose(u["head"]["kernel"], -0.01 - 0.01 * 0.5 * 1.0, rtol=ADAM_FLOAT32)


def test_adamw_takes_its_betas_and_eps_from_the_config():
  """Two steps by hand with β₁ = 0.5, β₂ = 0.75, eps = 0.1 (the defaults would give
  −0.01 and −0.01 within 5e-9: every value here is 5-17 % away from that). Bias
  corrections 1 − β^t of 0.25 or more and a dozen float32 operations: 1e-6 relative."""
  config = optim_config(name="adamw", learning_rate=0.01, weight_decay=0.0,
                        beta1=0.5, beta2=0.75, eps=0.1)
  tx = optim.create_optimizer(config, steps_per_epoch=10, num_epochs=1)
  first, second = run(tx, [jax.tree.map(lambda x: jnp.full_like(x, 2.0), params()),
                           ones_like(params())])
  m1, v1 = 0.5 * 2.0, 0.25 * 4.0
  expected1 = -0.01 * (m1 / 0.5) / (np.sqrt(v1 / 0.25) + 0.1)
  m2, v2 = 0.5 * m1 + 0.5 * 1.0, 0.75 * v1 + 0.25 * 1.0
  expected2 = -0.01 * (m2 / (1 - 0.5 ** 2)) / (np.sqrt(v2 / (1 - 0.75 ** 2)) + 0.1)
  for update, expected in ((first, expected1), (second, expected2)):
    for leaf in jax.tree.leaves(update):
      np.testing.assert_allclose(leaf, expected, rtol=1e-6)


def test_adamw_keeps_freezing_and_per_group_rates():
  config = optim_config(name="adamw", learning_rate=0.01, freeze="backbone",
                        backbone_lr_mult=0.5)
  tx = optim.create_optimizer(config, steps_per_epoch=1, num_epochs=4, frozen_for=1)
  grads = ones_like(params())
  frozen, thawed = run(tx, [grads, grads])
  np.testing.assert_array_equal(frozen["backbone"]["conv"]["kernel"], 0.0)
  np.testing.assert_allclose(frozen["head"]["bias"], -0.01, rtol=ADAM_FLOAT32)
  np.testing.assert_allclose(thawed["backbone"]["bn"]["bias"], -0.005, rtol=ADAM_FLOAT32)


def test_switching_the_optimizer_or_the_average_changes_the_state_layout():
  sgd = optim.state_layout(optim_config(momentum=0.9))
  adamw = optim.state_layout(optim_config(name="adamw", momentum=0.9))
  assert sgd["optim.name"] != adamw["optim.name"]
  assert adamw["optim.momentum"] is False  # AdamW keeps no SGD momentum.
  assert optim.state_layout(optim_config(ema_decay=0.99))["optim.ema_decay"] is True
