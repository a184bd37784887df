"""The stage-1 stage (PAPER.md step 3): the cross-entropy classifier, its checkpoints and whole-set passes.

The same trainer also makes the saliency bootstrap network (uncropped images,
see saliency_stage.py). Steps run data-parallel over the run's device mesh.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fgir_jax import metrics
from fgir_jax import parallel
from fgir_jax.data import augment
from fgir_jax.data import batching
from fgir_jax.train import inference
from fgir_jax.train import networks
from fgir_jax.train import stage1_step
from fgir_jax.train import stages
from fgir_jax.train.checkpoints import StageCheckpoints
from fgir_jax.train.context import Run, progress_bar


def _inputs(run: Run, images, labels) -> batching.DeviceInput:
  s1 = run.config.stage1
  train_tf = augment.transform_fn(True, size=run.size, crop=s1.crop,
                                  scale=(float(s1.crop_scale_min), 1.0))
  return batching.DeviceInput(images, labels, train_transform=train_tf,
                              eval_transform=augment.transform_fn(False))


def stage1_settings(config) -> stage1_step.Stage1Settings:
  s1 = config.stage1
  return stage1_step.Stage1Settings(
      epochs=s1.epochs, batch_size=s1.batch_size, learning_rate=s1.learning_rate,
      momentum=s1.momentum, weight_decay=s1.weight_decay, warmup_epochs=s1.warmup_epochs,
      label_smoothing=s1.label_smoothing, eval_every=s1.eval_every)


def train_classifier(run: Run, name: str, images: np.ndarray, epochs: int = 0):
  """Stage 1 on `images` (train split); returns (net, final variables, accuracy on the queries).

  epochs > 0 overrides stage1.epochs (the saliency bootstrap network).
  """
  ds, settings = run.dataset, stage1_settings(run.config)
  if epochs > 0:
    settings = dataclasses.replace(settings, epochs=int(epochs))
  train_in = _inputs(run, images[ds.is_train], ds.labels[ds.is_train])
  query_in = _inputs(run, images[~ds.is_train], ds.labels[~ds.is_train])
  net = networks.make_net(run.config, len(ds.class_names))
  steps = train_in.steps_per_epoch(settings.batch_size, train_in.num_examples >= settings.batch_size)
  optimizer = stage1_step.make_optimizer(settings, steps, trainable=net.trainable_mask)
  key = run.stage_key(name)
  parallel.check_divisible(settings.batch_size, run.mesh, "stage1.batch_size")
  state = stage1_step.create_state(networks.init_variables(run.config, net, key), optimizer)
  with StageCheckpoints(run.wd.checkpoint_dir("ckpt", name), best_metric="accuracy",
                        echo=run.echo) as ckpt:
    start, acc = 0, float("nan")
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(ckpt.latest_step(), state)
      start, acc = int(meta["epoch"]), float(meta["metrics"]["accuracy"])
      run.echo(f"{name}: resuming after epoch {start}")
    state = parallel.replicate(state, run.mesh)
    if start < settings.epochs:
      run.echo(f"{name}: compiling the train step (the first batch waits for it)")
    for epoch in range(start, settings.epochs):
      state, train_stats, timing = _classifier_epoch(run, name, net, optimizer, settings, state,
                                                     train_in, key, epoch)
      row = dict(train_stats)
      if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
        run.echo(f"{name}: evaluating on {query_in.num_examples} queries")
        acc = row["accuracy"] = _query_accuracy(run, net, stage1_step.variables_of(state), query_in)
      ckpt.save(epoch + 1, state, {"epoch": epoch + 1, "metrics": {"accuracy": acc}})
      run.wd.log(name, epoch=epoch + 1, **row)
      shown = f" query acc {row['accuracy']:.4f}" if "accuracy" in row else ""
      run.echo(f"{name}: epoch {epoch + 1}/{settings.epochs} loss {train_stats['loss']:.4f} "
               f"train acc {train_stats['train_accuracy']:.3f}{shown} ({timing})")
  # Downstream stages use the final epoch (the best one is kept on disk too):
  # picking the epoch by query accuracy would tune on the test set.
  return net, stage1_step.variables_of(state), acc


def _classifier_epoch(run, name, net, optimizer, settings, state, train_in, key, epoch):
  sums, count = {}, 0
  # Full batches only, unless the set is smaller than one batch (tiny runs).
  drop = train_in.num_examples >= settings.batch_size
  progress = progress_bar(run, train_in.steps_per_epoch(settings.batch_size, drop)
                          * settings.batch_size, f"{name} epoch {epoch + 1}", log_line=False)
  for batch in train_in.train_batches(key, epoch, settings.batch_size, drop_remainder=drop):
    batch = parallel.shard_batch(batch, run.mesh)
    state, m = stage1_step.train_step(state, batch, net=net, optimizer=optimizer,
                                     label_smoothing=settings.label_smoothing)
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    progress.update(settings.batch_size)
  progress.close()
  stats = {k: float(v) / max(count, 1) for k, v in sums.items()}
  if not np.isfinite(stats.get("loss", 0.0)):
    lower = settings.learning_rate / 10
    raise FloatingPointError(
        f"{name}: the loss became {stats['loss']} in epoch {epoch + 1}; the checkpoint of "
        f"epoch {epoch} is kept. Lower the learning rate and run again (the stage starts "
        f"afresh with it): {run.command} --config.stage1.learning_rate={lower:g}")
  stats["train_accuracy"] = stats.pop("accuracy", 0.0)
  return state, stats, progress.summary()


def _query_accuracy(run, net, variables, query_in) -> float:
  out = inference.run_network(net, variables, query_in, batch_size=run.config.eval.batch_size,
                              mesh=run.mesh)
  return metrics.accuracy(out["logits"], query_in.labels_np)


def encode_all(run: Run, net, variables, images, desc: str, with_maps: bool = False) -> dict:
  """Eval-mode outputs for every image, with a progress bar (a long pass on big sets).

  with_maps adds the saliency maps, from the layer saliency.layer names.
  """
  progress = progress_bar(run, len(images), desc)
  out = inference.run_network(net, variables, batching.DeviceInput(images, run.dataset.labels),
                              batch_size=run.config.eval.batch_size, with_maps=with_maps,
                              map_layer=run.config.saliency.layer,
                              progress=progress.update, mesh=run.mesh)
  progress.close()
  return out


def stage_stage1(run: Run, seed: int = 0) -> dict:
  """Trains stage 1, then writes the final network (stage1/network.msgpack) and its pooled
  features of every image (stage1/features.npz), which stage 2 and the evaluation use.
  Seed k >= 1 (config.seeds_from) trains its own network into stage1_s<k>/."""
  name = stages.stage_name("stage1", seed=seed)
  net, variables, acc = train_classifier(run, name, run.crops)
  networks.save_variables(run.wd.out(name, "network.msgpack"), variables)
  out = encode_all(run, net, variables, run.crops, "pooled features")
  np.savez(run.wd.out(name, "features.npz"), features=out["pooled"],
           labels=run.dataset.labels, is_train=run.dataset.is_train)
  return {"accuracy": acc}
