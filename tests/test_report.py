"""report.md on a fake finished work directory: numbers, "not run", paper gating, figures."""

import json
import os
import re

import numpy as np
import pytest

from fgir_jax.data import Dataset
from fgir_jax.train import config as config_lib
from fgir_jax.train import report
from fgir_jax.train import report_plots
from fgir_jax.train.workdir import Workdir, write_json

from conftest import write_marker

CLASSES, PER_CLASS, TEST_PER_CLASS, SIZE = 4, 6, 2, 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {"map_vs_epoch.png", "distances_vs_epoch.png", "map_vs_bits.png",
               "saliency_crops.png", "retrieval_grid.png"}


def _dataset(rng, boxes=True):
  labels = np.repeat(np.arange(CLASSES), PER_CLASS)
  is_train = np.tile(np.arange(PER_CLASS) >= TEST_PER_CLASS, CLASSES)
  images = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
  lo = rng.uniform(0.0, 0.4, (len(labels), 2))
  true = np.concatenate([lo, lo + rng.uniform(0.3, 0.6, (len(labels), 2))], 1).clip(0, 1)
  return Dataset(name="fake", labels=labels, is_train=is_train, images=images,
                 class_names=[f"class{i}" for i in range(CLASSES)],
                 boxes=true if boxes else None)


def _finished_run(tmp_path, source="cub", saliency_on=True):
  """A work directory as a finished run leaves it (numbers chosen to be recognisable)."""
  rng = np.random.default_rng(0)
  config = config_lib.base_config()
  config.data.source = source
  config.saliency.enabled = saliency_on
  config.stage2.bits = "16,64"
  wd = Workdir(str(tmp_path / "run"))
  ds = _dataset(rng)
  n_q, n_db = int((~ds.is_train).sum()), int(ds.is_train.sum())
  results = {"map": {"16": 0.4321, "64": 0.5678}, "map_tie_aware": {"16": 0.4, "64": 0.55},
             "precision_at_10": {"16": 0.3, "64": 0.35}, "accuracy": 0.6543,
             "dataset": "fake", "queries": n_q, "database": n_db}
  for epoch in (1, 2, 3):
    wd.log("stage1", epoch=epoch, accuracy=0.2 * epoch, loss=1.0 / epoch, train_accuracy=0.3)
  for bits in (16, 64):
    np.savez(os.path.join(wd.dir("codes"), f"codes_{bits}.npz"), bits=bits,
             query=np.packbits(rng.random((n_q, bits)) > 0.5, axis=1),
             database=np.packbits(rng.random((n_db, bits)) > 0.5, axis=1))
    for epoch in (1, 2):
      wd.log(f"stage2_{bits}", epoch=epoch, loss=0.5, d_ap=0.3, d_an=0.6 + epoch, margin=0.3,
             map=0.1 * epoch)
  if saliency_on:
    results.update(corloc=0.625, mean_iou=0.4567)
    for epoch in (1, 2):
      wd.log("saliency_net", epoch=epoch, accuracy=0.4, loss=1.0, train_accuracy=0.3)
    wd.log("saliency_net", uncropped_accuracy=0.5111)
    summary = {"alpha": 0.4, "mode": "largest", "corloc": 0.625, "mean_iou": 0.4567,
               "full_image_corloc": 0.125}
    wd.log("saliency", **summary)
    write_json(os.path.join(wd.dir("saliency"), "summary.json"), summary)
    np.savez(wd.file("saliency", "boxes.npz"), boxes=np.tile([0.1, 0.1, 0.9, 0.9], (len(ds), 1)),
             maps=rng.random((len(ds), 4, 4)).astype(np.float32))
  write_json(wd.file("results.json"), results)
  return wd, config, ds


def _figures_listed(text):
  return re.findall(r"\]\(plots/([^)]+\.png)\)", text)


def _read(path):
  with open(path) as f:
    return f.read()


def test_cub_report_has_run_numbers_beside_the_paper(tmp_path):
  wd, config, ds = _finished_run(tmp_path)
  path = report.write_report(wd, config, ds)  # no images: the numbers only
  text = _read(path)
  assert path == wd.file("report.md")
  # The run's own numbers.
  for number in ("56.78%", "43.21%", "65.43%", "62.50%", "45.67%", "12.50%"):
    assert number in text, number
  # The paper's, labelled with their dataset.
  assert "paper (CUB-200-2011)" in text and "68.22%" in text and "61.87%" in text
  assert "Stanford Dogs" not in text
  # Comparisons a single run does not make.
  assert re.search(r"\| ResNet18 \| not run \(see the ablation\) \| 61\.87% \(ResNet18\) \|", text)
  assert re.search(r"\| CE features \(no triplet loss\) \| not run \|", text)
  assert re.search(r"\| adaptive triplet loss \(Eq\. 2-3\) \| 56\.78% \|", text)
  assert re.search(r"\| 32 \| not run \| not run \| not run \|", text)
  # Without crops: the bootstrap network, labelled as such.
  assert "51.11% (bootstrap CE network `saliency_net`, 2 epochs" in text
  assert '"alpha": 0.4' in text  # the settings


def test_every_listed_figure_is_a_png(tmp_path):
  wd, config, ds = _finished_run(tmp_path)
  text = _read(report.write_report(wd, config, ds, images=ds.images, crops=ds.images))
  listed = _figures_listed(text)
  assert set(listed) == ALL_FIGURES
  for name in listed:
    path = wd.file("plots", name)
    assert os.path.getsize(path) > 1000, name
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, name
  assert "Not drawn" not in text


@pytest.mark.parametrize("source,shown,hidden", [
    ("dogs", ["paper (Stanford Dogs)", "38.26%", "no clear gain"], ["68.22", "61.87", "CUB"]),
    ("synthetic", ["paper has no numbers for synthetic data"], ["68.22", "38.26", "paper ("]),
    ("folder", ["paper has no numbers for folder data"], ["68.22", "38.26", "paper ("]),
])
def test_paper_numbers_only_for_the_matching_data(tmp_path, source, shown, hidden):
  wd, config, _ = _finished_run(tmp_path, source=source)
  text = _read(report.write_report(wd, config))
  for s in shown:
    assert s in text, s
  for s in hidden:
    assert s not in text, s


def test_run_without_images_or_saliency_still_reports(tmp_path):
  wd, config, _ = _finished_run(tmp_path, saliency_on=False)
  text = _read(report.write_report(wd, config))
  assert "56.78%" in text
  listed = set(_figures_listed(text))
  assert listed == {"map_vs_epoch.png", "distances_vs_epoch.png", "map_vs_bits.png"}
  assert "- saliency_crops.png: the saliency stage did not run" in text
  assert "- retrieval_grid.png: write_report was not given the dataset" in text
  assert not os.path.exists(wd.file("plots", "saliency_crops.png"))
  # Saliency off: the cropped row is not run, the uncropped row is stage 1.
  assert re.search(r"\| saliency crops \(alpha=0\.4\) \| not run \| not run \|", text)
  assert re.search(r"\| uncropped images \| 65\.43% \| 56\.78% \|", text)
  assert "not run: saliency.enabled is False" in text


def test_top_results_is_the_brute_force_hamming_ranking():
  rng = np.random.default_rng(1)
  for bits in (12, 64):  # 12: padded bytes must not count
    # Few distinct codes, so many ties that only database order can break.
    pool = rng.random((5, bits)) > 0.5
    q, db = pool[rng.integers(0, 5, 7)], pool[rng.integers(0, 5, 40)]
    idx, dist = report_plots.top_results(np.packbits(q, 1), np.packbits(db, 1), 10)
    brute = (q[:, None, :] != db[None, :, :]).sum(-1)
    want = np.array([sorted(range(len(db)), key=lambda j, i=i: (brute[i, j], j))[:10]
                     for i in range(len(q))])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(dist, np.take_along_axis(brute, want, 1))
  assert report.top_results is report_plots.top_results


def test_pick_queries_is_deterministic_and_spread_over_classes():
  labels = np.repeat(np.arange(20), 3)
  picked = report_plots.pick_queries(labels, 6)
  np.testing.assert_array_equal(picked, report_plots.pick_queries(labels, 6))
  assert len(set(labels[picked])) == 6 and labels[picked].min() == 0 and labels[picked].max() == 19
  # Fewer classes than rows: every class once, then the second image of each.
  np.testing.assert_array_equal(report_plots.pick_queries(np.repeat([0, 1], 4), 3), [0, 4, 1])


def test_markdown_table_and_paper_numbers():
  table = report.markdown_table(["a", "b"], [[1, "x|y"], [0.5, None]])
  assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |", "| 0.5 | None |"]
  cub = report.paper_numbers("cub")
  assert cub["dataset"] == "CUB-200-2011" and cub["map_by_bits"][64] == pytest.approx(0.6822)
  cub["map_by_bits"][64] = 0.0  # a copy: the constants stay intact
  assert report.paper_numbers("cub")["map_by_bits"][64] == pytest.approx(0.6822)
  assert report.paper_numbers("dogs")["map_by_loss"]["ce"] == pytest.approx(0.3826)
  assert report.paper_numbers("synthetic") == {} and report.paper_numbers("folder") == {}


def test_report_lists_stage_times_versions_devices_and_skipped_files(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  wd, config, ds = _finished_run(tmp_path)
  write_marker(wd, "data", {"skipped": 1, "skipped_files": ["/photos/broken.jpg"]})
  write_marker(wd, "stage1", {"accuracy": 0.5, "seconds": 12.3})
  text = _read(report.write_report(wd, config, ds))
  assert "## This run" in text and f"jax {jax.__version__}, flax " in text
  assert "| stage1 | 12.3 s |" in text
  assert "1 unreadable image file(s) were skipped" in text and "- /photos/broken.jpg" in text


# ----------------------------------------------------------------------------
# Readable figures and tables.
# ----------------------------------------------------------------------------
def test_titles_wrap_whole_names_and_never_cut_them():
  name = "yellow-crown/2-stripes/dot/fan-tail"
  wrapped = report_plots.wrap_title(f"d=0 {name}", width=22)
  assert all(len(line) <= 22 for line in wrapped.split("\n"))
  assert wrapped.replace("\n", "") == f"d=0 {name}"
  assert wrapped.split("\n")[1].startswith("2-stripes/")  # broken after "/", not inside a word
  assert report_plots.wrap_title("001.Black_footed_Albatross", 22) == "001.Black_footed_\nAlbatross"


def test_grid_draws_the_saliency_boxes_in_yellow(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grey = np.full((32, 32, 3), 128, np.uint8)

  def yellow_pixels(path):
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 80)).sum())

  plain = report_plots.image_grid([grey], ["q"], [[grey]], [["d=0"]], str(tmp_path / "a.png"))
  boxed = report_plots.image_grid([grey], ["q"], [[grey]], [["d=0"]], str(tmp_path / "b.png"),
                                  query_boxes=[[0.25, 0.25, 0.75, 0.75]])
  assert yellow_pixels(plain) == 0 and yellow_pixels(boxed) > 20


def test_distance_curves_pair_by_colour_with_the_legend_outside(tmp_path, monkeypatch):
  figures = []
  monkeypatch.setattr(report_plots, "_save", lambda fig, plots, name: figures.append(fig) or [name])
  rows = {b: [{"epoch": e, "d_ap": 1.0 / e, "d_an": 2.0 + b / 64} for e in (1, 2, 3)]
          for b in (16, 64)}
  report_plots._plot_distances(rows, str(tmp_path))  # pylint: disable=protected-access
  ax = figures[0].axes[0]
  lines = ax.get_lines()
  assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]
  assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color() == lines[3].get_color()
  legend = ax.get_legend()
  figures[0].canvas.draw()
  assert legend.get_window_extent().x0 > ax.get_window_extent().x1  # beside the axes, not on them
