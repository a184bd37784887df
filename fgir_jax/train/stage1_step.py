"""The stage-1 update step: cross-entropy training of the network (PAPER.md step 3).

The update step is one jitted pure function `(state, batch, key) -> (state,
measurements)`, donating its state (big_vision style). The state is a plain
dict pytree {"params", "batch_stats", "opt_state", "step"} so that Orbax saves
it as it is. Weight decay touches convolution and dense kernels only: decaying
BatchNorm scales and biases hurts small-batch fine-tuning and buys nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Stage1Settings:
  """Optimiser and schedule of stage 1 (see configs/*.py for the values used).

  SGD with Nesterov momentum, linear warm-up then cosine decay to zero, the
  de-facto recipe for fine-tuning ResNets on CUB and Dogs.
  """
  epochs: int = 50
  batch_size: int = 32
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_epochs: float = 1.0
  label_smoothing: float = 0.0
  eval_every: int = 1

  def __post_init__(self):
    for name in ("epochs", "batch_size", "eval_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"stage1 {name} must be a positive integer, got {getattr(self, name)}.")
    if not self.learning_rate > 0:
      raise ValueError(f"stage1 learning_rate must be positive, got {self.learning_rate}.")


def _decay_mask(params):
  """True for kernels (conv and dense weights), False for BatchNorm and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(settings: Stage1Settings, steps_per_epoch: int,
                   trainable=None) -> optax.GradientTransformation:
  """SGD + cosine schedule; `trainable(params)` -> bool tree freezes the False leaves.

  Frozen leaves get no update, no weight decay and no optimizer state
  (`optax.multi_transform` with `set_to_zero`), as STYLE.md asks.
  """
  total = max(1, settings.epochs * steps_per_epoch)
  warmup = min(total - 1, int(settings.warmup_epochs * steps_per_epoch))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=settings.learning_rate, warmup_steps=warmup, decay_steps=total)
  sgd = optax.chain(
      optax.add_decayed_weights(settings.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=settings.momentum, nesterov=True))
  if trainable is None:
    return sgd
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
  return optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()}, labels)


def create_state(variables: dict, optimizer: optax.GradientTransformation) -> dict:
  """The train state for `variables` = {"params", "batch_stats"} of the network."""
  params = variables["params"]
  return {"params": params, "batch_stats": variables.get("batch_stats", {}),
          "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def _cross_entropy(logits, labels, mask, label_smoothing):
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  weights = mask.astype(jnp.float32)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("net", "optimizer", "label_smoothing"),
                   donate_argnums=(0,))
def train_step(state: dict, batch: dict, *, net: nn.Module, optimizer, label_smoothing=0.0):
  """One SGD step on a batch {"image", "label", "mask"}; returns (state, measurements)."""

  def loss_fn(params):
    (logits, _), updates = net.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], train=True,
        mutable=["batch_stats"])
    loss = _cross_entropy(logits, batch["label"], batch["mask"], label_smoothing)
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  weights = batch["mask"].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  measurements = {"loss": loss, "accuracy": (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0),
                  "grad_norm": _global_norm(grads)}
  new_state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
               "step": state["step"] + 1}
  return new_state, measurements


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def variables_of(state: dict) -> dict:
  """The network variables {"params", "batch_stats"} held by a train state."""
  return {"params": state["params"], "batch_stats": state["batch_stats"]}
