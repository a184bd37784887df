"""Decode cache: RGB conversion, hits, invalidation, bad files, crops, atomic writes."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from fgir_jax import data
from fgir_jax.data import cache as cache_lib


def _save(path, img, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, **kwargs)
  return str(path)


@pytest.fixture
def files(tmp_path):
  """Five small images, one per storage kind the cache must convert."""
  d = tmp_path / "img"
  rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
  rgba.paste((255, 0, 0, 0), (0, 0, 10, 10))  # left half fully transparent
  palette = Image.new("P", (12, 12), 0)
  palette.putpalette([10, 200, 30] + [0] * 765)
  return [
      _save(d / "rgb.jpg", Image.new("RGB", (32, 24), (250, 10, 10)), quality=95),
      _save(d / "grey.jpg", Image.new("L", (24, 32), 100), quality=95),
      _save(d / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)), quality=95),
      _save(d / "palette.png", palette),
      _save(d / "alpha.png", rgba),
  ]


def test_rgb_conversion_of_every_mode(tmp_path):
  rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
  rgba.putpixel((0, 0), (255, 0, 0, 0))
  out = np.asarray(data.to_rgb(rgba))
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
  np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
  la = Image.new("LA", (1, 1), (0, 128))  # black at half opacity -> mid grey
  assert abs(int(np.asarray(data.to_rgb(la))[0, 0, 0]) - 127) <= 1
  np.testing.assert_array_equal(np.asarray(data.to_rgb(Image.new("L", (1, 1), 100)))[0, 0], [100] * 3)
  np.testing.assert_array_equal(np.asarray(data.to_rgb(Image.new("CMYK", (1, 1), (0, 255, 0, 0))))[0, 0],
                                [255, 0, 255])
  pal = Image.new("P", (1, 1), 1)
  pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
  np.testing.assert_array_equal(np.asarray(data.to_rgb(pal))[0, 0], [10, 200, 30])
  pal.info["transparency"] = 1
  np.testing.assert_array_equal(np.asarray(data.to_rgb(pal))[0, 0], [255, 255, 255])
  deep = Image.fromarray(np.full((1, 1), 65535, np.uint16))  # a 16-bit greyscale PNG
  np.testing.assert_array_equal(np.asarray(data.to_rgb(deep))[0, 0], [255] * 3)


def test_cached_images_decodes_converts_and_resizes(files, tmp_path):
  out = data.cached_images(files, 8, str(tmp_path / "cache"), progress=False)
  assert out.images.shape == (5, 8, 8, 3) and out.images.dtype == np.uint8
  assert not out.hit and out.bad == ()
  np.testing.assert_array_equal(out.kept, np.arange(5))
  img = out.images.astype(int)
  assert np.abs(img[0] - [250, 10, 10]).max() <= 6  # JPEG of a flat colour
  assert np.abs(img[1] - 100).max() <= 2
  assert img[2].min() >= 250  # CMYK (0, 0, 0, 0) is white
  np.testing.assert_array_equal(img[3], np.broadcast_to([10, 200, 30], (8, 8, 3)))
  np.testing.assert_array_equal(img[4][:, :3], 255)  # transparent half on white
  np.testing.assert_array_equal(img[4][:, 5:], np.broadcast_to([0, 0, 255], (8, 3, 3)))


def test_second_call_is_a_cache_hit_without_decoding(files, tmp_path, monkeypatch):
  first = data.cached_images(files, 8, str(tmp_path / "cache"), progress=False)
  calls = []
  real = cache_lib._resize
  monkeypatch.setattr(cache_lib, "_resize", lambda *a, **k: calls.append(1) or real(*a, **k))
  second = data.cached_images(files, 8, str(tmp_path / "cache"), progress=False)
  assert second.hit and calls == []
  np.testing.assert_array_equal(first.images, second.images)
  assert isinstance(second.images, np.memmap)
  # Another size is another cache entry, decoded afresh.
  assert not data.cached_images(files, 6, str(tmp_path / "cache"), progress=False).hit
  assert len(calls) == 5


def test_changed_file_invalidates(files, tmp_path):
  cache_dir = str(tmp_path / "cache")
  data.cached_images(files, 8, cache_dir, progress=False)
  Image.new("RGB", (32, 24), (0, 250, 0)).save(files[0], quality=95)
  os.utime(files[0], ns=(1, 10**18))  # a different mtime even on coarse file systems
  again = data.cached_images(files, 8, cache_dir, progress=False)
  assert not again.hit
  assert again.images[0, ..., 1].min() > 200  # the new green image
  assert data.cached_images(files, 8, cache_dir, progress=False).hit
  # One .npy + one .json per entry; no temporary files left behind.
  assert sorted(os.path.splitext(f)[1] for f in os.listdir(cache_dir)) == [".json", ".npy"]


def test_stale_or_broken_metadata_rebuilds(files, tmp_path):
  cache_dir = str(tmp_path / "cache")
  first = data.cached_images(files, 8, cache_dir, progress=False)
  meta_path = first.path[:-4] + ".json"
  with open(meta_path, "w") as f:
    f.write("{not json")
  assert not data.cached_images(files, 8, cache_dir, progress=False).hit
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta["count"] == 5 and meta["bad_indices"] == []


def test_interrupted_build_leaves_no_cache(files, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / "cache")
  real = cache_lib._decode_chunk

  def interrupted(out, paths, boxes, start, size, draft):
    if start > 0:
      raise KeyboardInterrupt
    return real(out, paths, boxes, start, size, draft)

  monkeypatch.setattr(cache_lib, "_CHUNK", 2)
  monkeypatch.setattr(cache_lib, "_decode_chunk", interrupted)
  with pytest.raises(KeyboardInterrupt):
    data.cached_images(files, 8, cache_dir, progress=False, workers=1)
  assert not os.path.exists(cache_dir)  # the folder it made for this build goes too
  monkeypatch.setattr(cache_lib, "_decode_chunk", real)
  assert not data.cached_images(files, 8, cache_dir, progress=False).hit


def test_bad_file_error_names_it_and_skip_bad_counts(files, tmp_path):
  bad = str(tmp_path / "img" / "broken.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  paths = files[:2] + [bad] + files[2:]
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(ValueError, match="broken.jpg.*skip_bad=True"):
    data.cached_images(paths, 8, cache_dir, progress=False)
  assert not glob.glob(os.path.join(cache_dir, "*"))
  out = data.cached_images(paths, 8, cache_dir, skip_bad=True, progress=False)
  assert out.bad == (bad,)
  np.testing.assert_array_equal(out.kept, [0, 1, 3, 4, 5])
  assert out.images.shape == (5, 8, 8, 3)
  reference = data.cached_images(files, 8, cache_dir, progress=False).images
  np.testing.assert_array_equal(out.images, reference)
  again = data.cached_images(paths, 8, cache_dir, skip_bad=True, progress=False)
  assert again.hit and again.bad == (bad,)
  np.testing.assert_array_equal(again.kept, out.kept)


def test_load_image_error_names_the_file(tmp_path):
  with pytest.raises(ValueError, match="nothing.png"):
    data.load_image(str(tmp_path / "nothing.png"), 8)


def test_crops_use_each_images_size_and_are_keyed_by_boxes(tmp_path):
  # A 40 x 20 (w x h) image: green inside x 10..30, y 5..15, red elsewhere.
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[...] = (255, 0, 0)
  pixels[5:15, 10:30] = (0, 255, 0)
  path = _save(tmp_path / "img" / "wide.png", Image.fromarray(pixels))
  cache_dir = str(tmp_path / "cache")
  box = np.array([[5 / 20, 10 / 40, 15 / 20, 30 / 40]], np.float32)
  crop = data.cached_crops([path], box, 8, cache_dir, progress=False)
  np.testing.assert_array_equal(crop.images[0], np.broadcast_to([0, 255, 0], (8, 8, 3)))
  assert data.cached_crops([path], box, 8, cache_dir, progress=False).hit
  right = data.cached_crops([path], np.array([[0, 0.8, 1, 1]]), 8, cache_dir, progress=False)
  assert not right.hit and right.path != crop.path
  np.testing.assert_array_equal(right.images[0], np.broadcast_to([255, 0, 0], (8, 8, 3)))
  with pytest.raises(ValueError, match=r"boxes must have shape \(1, 4\)"):
    data.cached_crops([path], np.zeros((2, 4)), 8, cache_dir)


def test_jpeg_draft_mode_matches_full_decode(tmp_path):
  # A large smooth JPEG: draft mode decodes it at 1/4 scale, which must not show.
  y, x = np.mgrid[0:480, 0:640]
  pixels = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], -1).astype(np.uint8)
  path = _save(tmp_path / "img" / "big.jpg", Image.fromarray(pixels), quality=95)
  box = (0.25, 0.5, 0.75, 1.0)
  for b in (None, box):
    fast = data.load_image(path, 64, b, draft=True).astype(int)
    slow = data.load_image(path, 64, b, draft=False).astype(int)
    assert np.abs(fast - slow).mean() < 2.0


def test_in_memory_dataset_is_resized_and_cropped_without_files(tmp_path):
  images = np.zeros((2, 10, 20, 3), np.uint8)
  images[:, :, 10:] = 255  # right half white
  ds = data.Dataset(name="mem", images=images, labels=[0, 1], is_train=[True, False], class_names=["a", "b"])
  full = data.cached_images(ds, 4, str(tmp_path / "cache"))
  assert full.images.shape == (2, 4, 4, 3) and full.path is None
  crop = data.cached_crops(ds, [[0, 0.5, 1, 1]] * 2, 4, str(tmp_path / "cache"))
  assert crop.images.min() == 255
  assert not os.path.exists(tmp_path / "cache")


def test_process_pool_and_no_cache_dir_give_the_same_pixels(files, tmp_path):
  threads = data.cached_images(files, 8, str(tmp_path / "a"), progress=False)
  procs = data.cached_images(files, 8, str(tmp_path / "b"), executor="process", workers=2, progress=False)
  memory = data.cached_images(files, 8, None, progress=False)
  np.testing.assert_array_equal(threads.images, procs.images)
  np.testing.assert_array_equal(threads.images, memory.images)
  assert memory.path is None


def test_progress_in_a_log_is_one_line_at_the_end(files, tmp_path, capsys):
  data.cached_images(files, 8, str(tmp_path / "cache"), progress=True)
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and ": 5 img in " in err


def test_temporary_files_of_killed_runs_are_removed(files, tmp_path):
  cache_dir = str(tmp_path / "cache")
  first = data.cached_images(files, 8, cache_dir, progress=False)
  stem = first.path[:-4]
  orphan = f"{stem}.npy.tmp-{2**22 + 12345}-deadbeef"  # above Linux's pid_max: never running
  with open(orphan, "wb") as f:
    f.write(b"half a cache")
  os.remove(stem + ".json")  # force a rebuild of this entry
  data.cached_images(files, 8, cache_dir, progress=False)
  assert not os.path.exists(orphan)


def test_progress_rates_wait_for_the_first_update_and_a_terminal_gets_a_live_bar():
  import io  # pylint: disable=g-import-not-at-top
  from fgir_jax.progress import Progress  # pylint: disable=g-import-not-at-top

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  log = io.StringIO()
  bar = Progress(10, "epoch 1", stream=log, log_line=False)
  bar.update(2)  # the first batch (it waited for the compile): no rate yet
  assert bar.rate == 0.0 and "img/s" not in bar.summary()
  bar.update(3)
  assert bar.rate > 0 and "img/s" in bar.summary()
  bar.close()
  assert log.getvalue() == ""  # an epoch in a log: its stage prints the one line
  tty = Terminal()
  bar = Progress(10, "decode", stream=tty)
  for _ in range(5):
    bar.update(2)
  bar.close()
  assert "decode" in tty.getvalue() and "10/10" in tty.getvalue()
