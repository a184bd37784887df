"""The hash layer (PAPER.md step 4): Dense + tanh on frozen features, trained with the (adaptive) triplet loss.

Everything before the hash layer is frozen (PAPER.md step 4), so the pooled
features are computed once and stage 2 trains only Dense(bits) + tanh on them:
the same result as running the frozen network every step, far faster.

Pooled post-ReLU features all share a large positive mean; a hash layer on
them starts with every code alike and the triplet losses cannot pull the codes
apart (mAP at chance on CUB-sized data). Stage 2 therefore trains on features
standardised with the training set's per-dimension mean and std, and folds
that affine map into the Dense layer at the end (`hash_params`), so the
result is an ordinary HashHead on the network's raw pooled features.
Triplets are re-mined over the whole training set every `mine_every` epochs
(Eq. 4) and one epoch is a single jitted `lax.scan` over triplet batches, so
the host only loops over epochs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgir_jax import class_losses
from fgir_jax import losses
from fgir_jax import mining
from fgir_jax import parallel
from fgir_jax.models.heads import HashHead

LOSSES = ("adaptive", "triplet", "ce")
MARGIN_MODES = ("batch", "ema", "fixed")
CLASS_TERMS = ("none", "centers", "proxies", "classifier")


@dataclasses.dataclass(frozen=True)
class Stage2Settings:
  """What stage 2 trains and how; hashable so that it can be a static jit argument.

  loss: "adaptive" (Eq. 2), "triplet" (Eq. 1, classic, with `margin`) or "ce"
    (the paper's baseline of cross-entropy features: the hash layer trained
    with softmax cross-entropy through a linear classifier on its outputs;
    needs `num_classes`).
  margin_mode (adaptive only): "batch" is Eq. 3 on each batch's triplets,
    "ema" an exponential moving average of it across steps, "fixed" uses `margin`.
  class_term: a class-aware term added to the loss with weight `class_weight`
    (beyond the paper; fgir_jax.class_losses): "none", "centers" (CSQ's hash
    centres), "proxies" (OrthoHash's orthogonal proxies) or "classifier" (a
    linear classifier on the relaxed codes). It covers every row of a batch
    (anchors, positives and negatives) and needs `num_classes`.
  """
  bits: int
  epochs: int = 90
  mine_every: int = 3
  batch_size: int = 128
  learning_rate: float = 1e-3
  loss: str = "adaptive"
  margin_mode: str = "batch"
  margin: float = 0.2
  ema_decay: float = 0.9
  beta: float = 0.5
  neg_factor: float = 0.1
  num_classes: int = 0
  class_term: str = "none"
  class_weight: float = 0.5

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"stage2 loss must be one of {LOSSES}, got {self.loss!r}.")
    if self.margin_mode not in MARGIN_MODES:
      raise ValueError(f"stage2 margin_mode must be one of {MARGIN_MODES}, got {self.margin_mode!r}.")
    for name in ("bits", "epochs", "mine_every", "batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"stage2 {name} must be a positive integer, got {getattr(self, name)}.")
    if self.class_term not in CLASS_TERMS:
      raise ValueError(f"stage2 class_term must be one of {CLASS_TERMS}, got {self.class_term!r}.")
    if not float(self.class_weight) >= 0.0:
      raise ValueError(f"stage2 class_weight must be >= 0, got {self.class_weight}.")
    if (self.loss == "ce" or self.class_term != "none") and self.num_classes < 2:
      raise ValueError("stage2 loss='ce' and a class_term need num_classes >= 2 (one output "
                       "or centre per class).")

  @property
  def has_classifier(self) -> bool:
    return self.loss == "ce" or self.class_term == "classifier"


# ----------------------------------------------------------------------------
# The hash head: the network's own HashHead, applied to cached pooled features,
# so the trained params are exactly the network's params["hash"].
# ----------------------------------------------------------------------------
def init_hash_params(key: jax.Array, in_dim: int, bits: int) -> dict:
  return HashHead(bits).init(key, jnp.zeros((1, in_dim), jnp.float32))["params"]


def hash_outputs(params: dict, features: jax.Array) -> jax.Array:
  """(n, c) features -> (n, bits) tanh outputs; the binary code is output > 0."""
  bits = params["kernel"].shape[-1]
  return HashHead(bits).apply({"params": params}, features)


# ----------------------------------------------------------------------------
# One epoch: a scan over batches of triplets (global indices into features).
# ----------------------------------------------------------------------------
def _trainable(state: dict) -> dict:
  """What the optimizer updates: the hash layer, and its classifier (loss "ce", class_term
  "classifier")."""
  return {k: state[k] for k in ("params", "classifier") if k in state}


def _class_term(trainable, emb, labels, valid, settings):
  """The class-aware term over the batch's rows (emb: (3B, bits), labels and valid per row)."""
  if settings.class_term == "classifier":
    c = trainable["classifier"]
    return class_losses.classifier_loss(emb, labels, c["kernel"], c["bias"], valid)
  # Fixed class codes: constants of the compiled step.
  codes = class_losses.hash_centers(settings.num_classes, settings.bits)
  if settings.class_term == "centers":
    return class_losses.center_loss(emb, labels, codes, valid)
  return class_losses.proxy_loss(emb, labels, codes, valid=valid)


def _batch_terms(trainable, features, labels, triplets, valid, margin, settings):
  """Loss and distance statistics for one (B, 3) batch of global triplets."""
  batch = triplets.shape[0]
  emb = hash_outputs(trainable["params"], features[triplets.reshape(-1)])  # rows a0 p0 n0 a1 ...
  dist = losses.pairwise_distances(emb)
  local = jnp.arange(batch)[:, None] * 3 + jnp.arange(3)[None, :]
  if settings.loss == "triplet":
    loss = losses.triplet_loss(dist, local, margin=settings.margin, valid=valid)
  elif settings.loss == "ce":  # every anchor once per epoch: plain CE over the examples
    c = trainable["classifier"]
    loss = class_losses.classifier_loss(emb[0::3], labels[triplets[:, 0]], c["kernel"],
                                        c["bias"], valid)
  else:
    loss = losses.adaptive_triplet_loss(dist, local, margin=margin, valid=valid)
  if settings.class_term != "none":
    loss = loss + settings.class_weight * _class_term(
        trainable, emb, labels[triplets.reshape(-1)], jnp.repeat(valid, 3), settings)
  stats = losses.triplet_stats(dist, local, valid)
  return loss, {"d_ap": stats["d_ap"], "d_an": stats["d_an"], "count": stats["num_valid"]}


@functools.partial(jax.jit, static_argnames=("settings", "optimizer"), donate_argnums=(0,))
def _train_epoch(state, features, labels, triplets, valid, *, settings, optimizer):
  """Runs every (B, 3) batch of `triplets` (num_batches, B, 3) once."""

  def step(state, batch):
    trip, ok = batch
    if settings.margin_mode == "batch":
      margin = None  # Eq. 3 on this batch, inside the loss
    elif settings.margin_mode == "fixed":
      margin = settings.margin
    else:
      margin = state["ema_margin"]
    trainable = _trainable(state)
    (loss, stats), grads = jax.value_and_grad(_batch_terms, has_aux=True)(
        trainable, features, labels, trip, ok, margin, settings)
    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    batch_margin = jax.lax.stop_gradient(stats["d_an"] - stats["d_ap"])
    has_any = stats["count"] > 0
    ema = jnp.where(has_any, settings.ema_decay * state["ema_margin"]
                    + (1 - settings.ema_decay) * batch_margin, state["ema_margin"])
    new_state = dict(state, **trainable, opt_state=opt_state, ema_margin=ema)
    return new_state, dict(stats, loss=loss)

  state, per_batch = jax.lax.scan(step, state, (triplets, valid))
  weights = per_batch["count"]
  total = jnp.maximum(weights.sum(), 1.0)
  epoch_stats = {k: (per_batch[k] * weights).sum() / total for k in ("loss", "d_ap", "d_an")}
  return state, epoch_stats


def _batched_triplets(key, triplets, valid, batch_size):
  """Shuffles the mined triplets and cuts them into (num_batches, B, 3) with a mask."""
  n = triplets.shape[0]
  order = jax.random.permutation(key, n)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  trip = jnp.concatenate([triplets[order], jnp.zeros((pad, 3), jnp.int32)])
  ok = jnp.concatenate([valid[order], jnp.zeros((pad,), bool)])
  return trip.reshape(num_batches, batch_size, 3), ok.reshape(num_batches, batch_size)


def standardiser(features) -> dict:
  """Per-dimension mean and std of the training features (std floored for dead units)."""
  mean = jnp.mean(features, axis=0)
  std = jnp.std(features, axis=0)
  return {"mean": mean, "std": jnp.maximum(std, 1e-3 * jnp.maximum(jnp.max(std), 1e-12))}


def hash_params(state: dict) -> dict:
  """The trained hash layer for raw pooled features: standardisation folded in.

  tanh(((x - mean) / std) @ W + b) == tanh(x @ (W / std[:, None]) + (b - (mean / std) @ W)).
  """
  params, norm = state["train"]["params"], state["norm"]
  kernel = params["kernel"] / norm["std"][:, None]
  return {"kernel": kernel, "bias": params["bias"] - norm["mean"] @ kernel}


def mine_triplets(key, params, features, labels, settings: Stage2Settings, mesh=None):
  """Eq. 4 over the whole training set, on the current hash outputs.

  Blocked over anchors: no n x n matrix, the same triplets as mining the full
  distance matrix, and faster. A mesh splits the anchors over its devices.
  """
  emb = hash_outputs(params, features)
  return mining.hard_triplets_from_embeddings(key, emb, labels, beta=settings.beta,
                                              neg_factor=settings.neg_factor, mesh=mesh)


def init_state(key, features, labels, settings: Stage2Settings, optimizer) -> dict:
  """A fresh stage-2 state: hash params, optimizer, EMA margin, first triplets."""
  params = init_hash_params(key, features.shape[1], settings.bits)
  triplets, valid = mine_triplets(jax.random.fold_in(key, 1), params, features, labels, settings)
  # The moving-average margin starts at Eq. 3 on the first mined triplets
  # (distances of the triplets' rows only: no n x n matrix for large n).
  emb = hash_outputs(params, features)
  d_ap = jnp.linalg.norm(emb[triplets[:, 0]] - emb[triplets[:, 1]], axis=-1)
  d_an = jnp.linalg.norm(emb[triplets[:, 0]] - emb[triplets[:, 2]], axis=-1)
  w = valid.astype(jnp.float32)
  margin0 = ((d_an - d_ap) * w).sum() / jnp.maximum(w.sum(), 1.0)
  train = {"params": params, "ema_margin": margin0}
  if settings.has_classifier:
    train["classifier"] = {
        "kernel": jax.nn.initializers.lecun_normal()(jax.random.fold_in(key, 2),
                                                      (settings.bits, settings.num_classes)),
        "bias": jnp.zeros((settings.num_classes,), jnp.float32)}
  train["opt_state"] = optimizer.init(_trainable(train))
  return {"train": train,
          "triplets": triplets, "valid": valid, "epoch": jnp.zeros((), jnp.int32)}


def standardise(features, norm: dict) -> jax.Array:
  return (features - norm["mean"]) / norm["std"]


def new_state(key, features, labels, settings: Stage2Settings) -> dict:
  """The state `train_hash_layer(key, features, ...)` starts from (raw features)."""
  norm = standardiser(jnp.asarray(features, jnp.float32))
  state = init_state(key, standardise(jnp.asarray(features, jnp.float32), norm), np.asarray(labels),
                     settings, make_optimizer(settings))
  return dict(state, norm=norm)


def make_optimizer(settings: Stage2Settings):
  return optax.adam(settings.learning_rate)


def train_hash_layer(
    key: jax.Array,
    features: Any,
    labels: Any,
    settings: Stage2Settings,
    *,
    state: dict | None = None,
    on_epoch: Callable[[int, dict, dict], None] | None = None,
    mesh=None,
) -> dict:
  """Trains the hash layer; returns the final state (`hash_params(state)` for codes).

  features: (n, c) float pooled features of the training set (frozen network),
  standardised internally (see the module docstring).
  labels: (n,) int class ids. `state` resumes a run: it holds the epoch and the
  current triplets, so a resumed run trains exactly as an uninterrupted one.
  `on_epoch(epoch, state, stats)` is called after every epoch (metrics,
  checkpoints, evaluation) with the epoch's mean loss, d_ap, d_an and margin.
  `mesh` (fgir_jax.parallel.data_mesh): each batch of triplets is split over
  its devices (batch_size a multiple of them) and the miner's anchors too.
  """
  parallel.check_divisible(settings.batch_size, mesh, "stage2.batch_size")
  features = jnp.asarray(features, jnp.float32)
  labels = np.asarray(labels)
  labels_dev = jnp.asarray(labels, jnp.int32)
  optimizer = make_optimizer(settings)
  init_key, run_key = jax.random.split(key)
  if state is None:
    state = new_state(init_key, features, labels, settings)
  features = standardise(features, state["norm"])
  for epoch in range(int(state["epoch"]), settings.epochs):
    mine_key, shuffle_key = jax.random.split(jax.random.fold_in(run_key, epoch))
    if epoch > 0 and epoch % settings.mine_every == 0:
      state["triplets"], state["valid"] = mine_triplets(
          mine_key, state["train"]["params"], features, labels, settings, mesh)
    batches = _batched_triplets(shuffle_key, state["triplets"], state["valid"], settings.batch_size)
    # (num_batches, B, ...): the scan walks the batches, the devices split each one.
    batches = parallel.shard_batch(batches, mesh, axis=1)
    state["train"], stats = _train_epoch(
        parallel.replicate(state["train"], mesh), features, labels_dev, *batches,
        settings=settings, optimizer=optimizer)
    state["epoch"] = jnp.asarray(epoch + 1, jnp.int32)
    stats = {k: float(v) for k, v in stats.items()}
    stats["margin"] = stats["d_an"] - stats["d_ap"]
    if not np.isfinite(stats["loss"]):
      raise FloatingPointError(
          f"stage 2 loss became {stats['loss']} at epoch {epoch + 1}; lower "
          "stage2.learning_rate (the last good checkpoint is kept).")
    if on_epoch is not None:
      on_epoch(epoch + 1, state, stats)
  return state
