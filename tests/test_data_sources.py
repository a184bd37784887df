"""Sources: CUB, Stanford Dogs, image folder and tfds readers on tiny folders in the real layouts."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from fgir_jax import data


def _jpeg(path, width, height, mode="RGB", colour=(200, 30, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fill = colour if mode == "RGB" else colour[0]
  Image.new(mode, (width, height), fill).save(path, quality=95)


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- CUB


@pytest.fixture
def cub_root(tmp_path):
  """A 4-image CUB_200_2011 subset with classes 1 and 2 (of 3 in classes.txt)."""
  base = tmp_path / "CUB_200_2011"
  images = [  # id, relative path, class id, is_train, (width, height), x y w h, mode
      (1, "001.Albatross/a_1.jpg", 1, 1, (40, 30), (4, 3, 20, 15), "RGB"),
      (2, "001.Albatross/a_2.jpg", 1, 0, (20, 50), (0, 10, 20, 45), "L"),  # greyscale, overshoots
      (3, "002.Auklet/b_1.jpg", 2, 1, (64, 32), (16, 8, 32, 16), "RGB"),
      (4, "002.Auklet/b_2.jpg", 2, 0, (30, 30), (3, 6, 9, 12), "RGB"),
  ]
  for _, rel, _, _, (w, h), _, mode in images:
    _jpeg(str(base / "images" / rel), w, h, mode)
  _write(base / "images.txt", [f"{i} {rel}" for i, rel, *_ in images])
  _write(base / "image_class_labels.txt", [f"{i} {c}" for i, _, c, *_ in images])
  _write(base / "train_test_split.txt", [f"{i} {t}" for i, _, _, t, *_ in images])
  # Lines in another order than images.txt: the reader joins on the image id.
  _write(base / "bounding_boxes.txt",
         [f"{i} {x} {y} {bw} {bh}" for i, _, _, _, _, (x, y, bw, bh), _ in reversed(images)])
  _write(base / "classes.txt", ["1 001.Albatross", "2 002.Auklet", "3 003.Parakeet"])
  return tmp_path


def test_cub_reads_layout_labels_split_and_boxes(cub_root):
  cub = data.read_cub(str(cub_root))
  assert isinstance(cub.paths, list) and all(isinstance(p, str) for p in cub.paths)
  assert [os.path.basename(p) for p in cub.paths] == ["a_1.jpg", "a_2.jpg", "b_1.jpg", "b_2.jpg"]
  np.testing.assert_array_equal(cub.labels, [0, 0, 1, 1])
  assert cub.labels.dtype == np.int32
  np.testing.assert_array_equal(cub.is_train, [True, False, True, False])
  assert cub.class_names == ("001.Albatross", "002.Auklet", "003.Parakeet")
  np.testing.assert_array_equal(cub.sizes, [[30, 40], [50, 20], [32, 64], [30, 30]])
  # (ymin, xmin, ymax, xmax) = (y/h, x/w, (y+bh)/h, (x+bw)/w) with each image's own size.
  expected = [[3 / 30, 4 / 40, 18 / 30, 24 / 40],
              [10 / 50, 0.0, 1.0, 1.0],  # 55/50 clipped to 1, as tfds does
              [8 / 32, 16 / 64, 24 / 32, 48 / 64],
              [6 / 30, 3 / 30, 18 / 30, 12 / 30]]
  np.testing.assert_allclose(cub.boxes, expected, rtol=1e-6)
  assert cub.boxes.dtype == np.float32 and cub.boxes.shape == (4, 4)


def test_cub_root_may_be_the_dataset_folder_itself(cub_root):
  direct = data.read_cub(str(cub_root / "CUB_200_2011"))
  assert direct.paths == data.read_cub(str(cub_root)).paths


def test_cub_greyscale_image_decodes_to_rgb(cub_root, tmp_path):
  cub = data.read_cub(str(cub_root))
  images = data.cached_images(cub, 16, str(tmp_path / "cache"), progress=False).images
  assert images.shape == (4, 16, 16, 3)
  grey = images[1].astype(int)
  assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])


def test_cub_missing_image_is_named(cub_root):
  missing = cub_root / "CUB_200_2011" / "images" / "002.Auklet" / "b_1.jpg"
  os.remove(missing)
  with pytest.raises(ValueError, match="b_1.jpg.*missing"):
    data.read_cub(str(cub_root))


@pytest.mark.parametrize("fname", ["images.txt", "train_test_split.txt", "bounding_boxes.txt"])
def test_cub_missing_metadata_names_file_and_source(cub_root, fname):
  os.remove(cub_root / "CUB_200_2011" / fname)
  with pytest.raises(ValueError, match="data.caltech.edu") as err:
    data.read_cub(str(cub_root))
  assert fname in str(err.value) or "images.txt" in str(err.value)
  assert "\n" not in str(err.value)


def test_cub_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.read_cub(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="CUB_200_2011"):
    data.read_cub(str(tmp_path))


def test_cub_malformed_line_is_named(cub_root):
  _write(cub_root / "CUB_200_2011" / "train_test_split.txt", ["1 1", "2 x", "3 1", "4 0"])
  with pytest.raises(ValueError, match="train_test_split.txt line 2"):
    data.read_cub(str(cub_root))


def test_cub_split_helpers(cub_root):
  cub = data.read_cub(str(cub_root))
  assert len(cub.train) == 2 and cub.train.is_train.all()
  assert len(cub.test) == 2 and not cub.test.is_train.any()
  np.testing.assert_array_equal(cub.test.boxes, cub.boxes[[1, 3]])


# ---------------------------------------------------------------- Stanford Dogs


def _voc(path, width, height, boxes):
  objects = "".join(
      f"<object><name>dog</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
      f"<ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1 in boxes)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{objects}</annotation>")


def _mat_list(path, files, labels):
  scipy_io = pytest.importorskip("scipy.io")
  cells = np.empty((len(files), 1), dtype=object)  # MATLAB N x 1 cell arrays, as in lists.tar
  annos = np.empty((len(files), 1), dtype=object)
  for i, f in enumerate(files):
    cells[i, 0] = f
    annos[i, 0] = os.path.splitext(f)[0]
  scipy_io.savemat(path, {"file_list": cells, "annotation_list": annos,
                          "labels": np.asarray(labels, np.float64).reshape(-1, 1)})


@pytest.fixture
def dogs_root(tmp_path):
  root = tmp_path / "dogs"
  breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
  sizes = {f"{breeds[0]}/n02085620_1.jpg": (50, 40), f"{breeds[0]}/n02085620_2.jpg": (30, 60),
           f"{breeds[1]}/n02085782_1.jpg": (80, 20), f"{breeds[1]}/n02085782_2.jpg": (40, 40)}
  boxes = {f"{breeds[0]}/n02085620_1.jpg": [(5, 4, 25, 20), (30, 10, 45, 36)],  # two dogs
           f"{breeds[0]}/n02085620_2.jpg": [(0, 0, 30, 60)],
           f"{breeds[1]}/n02085782_1.jpg": [(8, 2, 40, 18)],
           f"{breeds[1]}/n02085782_2.jpg": [(10, 10, 20, 30)]}
  for rel, (w, h) in sizes.items():
    _jpeg(str(root / "Images" / rel), w, h)
    _voc(str(root / "Annotation" / os.path.splitext(rel)[0]), w, h, boxes[rel])
  files = list(sizes)
  _mat_list(str(root / "train_list.mat"), [files[0], files[2]], [1, 2])
  os.makedirs(root / "lists")
  _mat_list(str(root / "lists" / "test_list.mat"), [files[1], files[3]], [1, 2])
  return root


def test_dogs_reads_mat_lists_xml_boxes(dogs_root):
  dogs = data.read_dogs(str(dogs_root))
  assert [os.path.basename(p) for p in dogs.paths] == [
      "n02085620_1.jpg", "n02085782_1.jpg", "n02085620_2.jpg", "n02085782_2.jpg"]
  np.testing.assert_array_equal(dogs.labels, [0, 1, 0, 1])
  np.testing.assert_array_equal(dogs.is_train, [True, True, False, False])
  assert dogs.class_names == ("n02085620-Chihuahua", "n02085782-Japanese_spaniel")
  # Union of the two dogs in image 0: x 5..45 of 50, y 4..36 of 40.
  np.testing.assert_allclose(dogs.boxes[0], [4 / 40, 5 / 50, 36 / 40, 45 / 50], rtol=1e-6)
  np.testing.assert_allclose(dogs.boxes[1], [2 / 20, 8 / 80, 18 / 20, 40 / 80], rtol=1e-6)
  np.testing.assert_allclose(dogs.boxes[3], [10 / 40, 10 / 40, 30 / 40, 20 / 40], rtol=1e-6)
  np.testing.assert_array_equal(dogs.sizes, [[40, 50], [20, 80], [60, 30], [40, 40]])


def test_dogs_box_modes(dogs_root):
  largest = data.read_dogs(str(dogs_root), box="largest").boxes[0]
  first = data.read_dogs(str(dogs_root), box="first").boxes[0]
  # Dog 1 is 20 x 16 = 320 px, dog 2 is 15 x 26 = 390 px.
  np.testing.assert_allclose(largest, [10 / 40, 30 / 50, 36 / 40, 45 / 50], rtol=1e-6)
  np.testing.assert_allclose(first, [4 / 40, 5 / 50, 20 / 40, 25 / 50], rtol=1e-6)
  with pytest.raises(ValueError, match="box must be one of"):
    data.read_dogs(str(dogs_root), box="mean")


def test_dogs_missing_pieces_are_named(dogs_root):
  os.remove(dogs_root / "Annotation" / "n02085782-Japanese_spaniel" / "n02085782_2")
  with pytest.raises(ValueError, match="n02085782_2.*annotation.tar"):
    data.read_dogs(str(dogs_root))
  os.remove(dogs_root / "Images" / "n02085620-Chihuahua" / "n02085620_2.jpg")
  with pytest.raises(ValueError, match="n02085620_2.jpg.*missing"):
    data.read_dogs(str(dogs_root))
  os.remove(dogs_root / "train_list.mat")
  with pytest.raises(ValueError, match="train_list.mat.*lists.tar"):
    data.read_dogs(str(dogs_root))


# ---------------------------------------------------------------- image folder


def _folder(root, counts):
  for name, count in counts.items():
    os.makedirs(root / name, exist_ok=True)
    for i in range(count):
      Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"img{i:02d}.png")


def test_folder_classes_files_and_stratified_split(tmp_path):
  root = tmp_path / "flowers"
  _folder(root, {"b_rose": 10, "a_daisy": 7, "c_single": 1})
  (root / "a_daisy" / "notes.txt").write_text("not an image")
  (root / "a_daisy" / ".hidden.jpg").write_bytes(b"")
  os.makedirs(root / "empty")
  ds = data.read_folder(str(root), test_fraction=0.3, seed=1)
  assert ds.class_names == ("a_daisy", "b_rose", "c_single")
  assert ds.name == "flowers" and len(ds) == 18
  tests = [int((~ds.is_train[ds.labels == c]).sum()) for c in range(3)]
  assert tests == [2, 3, 0]  # round(0.3 * n); a single image stays in training


def test_folder_split_is_seeded_and_per_class(tmp_path):
  root = tmp_path / "set"
  _folder(root, {"a": 20, "b": 20})
  first = data.read_folder(str(root), test_fraction=0.5, seed=3)
  again = data.read_folder(str(root), test_fraction=0.5, seed=3)
  other = data.read_folder(str(root), test_fraction=0.5, seed=4)
  np.testing.assert_array_equal(first.is_train, again.is_train)
  assert not np.array_equal(first.is_train, other.is_train)
  # Adding a class leaves the other classes' splits where they were.
  _folder(root, {"0_new": 5})
  grown = data.read_folder(str(root), test_fraction=0.5, seed=3)
  for name in ("a", "b"):
    old = first.is_train[first.labels == first.class_names.index(name)]
    new = grown.is_train[grown.labels == grown.class_names.index(name)]
    np.testing.assert_array_equal(old, new)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.read_folder(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="no class folder"):
    data.read_folder(str(tmp_path))
  with pytest.raises(ValueError, match="test_fraction"):
    data.read_folder(str(tmp_path), test_fraction=1.0)


# ---------------------------------------------------------------- tfds


def test_tfds_missing_tensorflow_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'.*--config\.data\.root=DIR"):
    data.load_tfds("caltech_birds2011")
  with pytest.raises(ValueError, match="caltech_birds2011, stanford_dogs"):
    data.load_tfds("mnist")


def _jpeg_bytes(width, height, value):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (value, 100, 200)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _fake_split(name):
  """What builder.as_dataset yields with the image left encoded, 3 examples per split.

  tfds's own random mock data cannot be used here: with a decoder it encodes
  random boxes, and tfds rejects those with min > max.
  """
  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, read_config, shuffle_files
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    assert "image" in decoders  # load_tfds must keep the original bytes
    offset = 0 if str(split) == "train" else 3
    example = {"image": tf.constant([_jpeg_bytes(20 + 4 * i, 12, 10 * (offset + i)) for i in range(3)]),
               "label": tf.constant([offset + i for i in range(3)], tf.int64)}
    first = [[0.1, 0.2, 0.5, 0.6]] * 3
    second = [[0.3, 0.1, 0.9, 0.7]] * 3  # larger than the first
    if name == "caltech_birds2011":
      example["bbox"] = tf.constant(first, tf.float32)
    else:
      example["objects"] = {"bbox": tf.constant(np.stack([first, second], 1), tf.float32)}
    return tf.data.Dataset.from_tensor_slices(example)
  return as_dataset


@pytest.mark.parametrize("name", ["caltech_birds2011", "stanford_dogs"])
def test_tfds_mock_data_materialises_the_original_bytes(name, tmp_path):
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  out = tmp_path / "materialised"
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_fake_split(name)):
    ds = data.load_tfds(name, data_dir=str(tmp_path / "tfds"), out_dir=str(out))
  np.testing.assert_array_equal(ds.labels, [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(ds.is_train, [True] * 3 + [False] * 3)
  assert ds.num_classes == (200 if name == "caltech_birds2011" else 120)
  assert all(p.startswith(str(out)) and p.endswith(".jpg") for p in ds.paths)
  with open(ds.paths[4], "rb") as f:
    assert f.read() == _jpeg_bytes(24, 12, 40)  # test example 1, written unchanged
  union = [0.1, 0.1, 0.9, 0.7] if name == "stanford_dogs" else [0.1, 0.2, 0.5, 0.6]
  np.testing.assert_allclose(ds.boxes, [union] * 6, rtol=1e-6)
  images = data.cached_images(ds, 8, cache_dir=None, progress=False).images
  assert images.shape == (6, 8, 8, 3)
  # A second call reuses the files through the manifest, with tfds no longer mocked;
  # the box mode is applied when loading.
  again = data.load_tfds(name, out_dir=str(out), box="largest")
  assert again.paths == ds.paths
  largest = [0.3, 0.1, 0.9, 0.7] if name == "stanford_dogs" else [0.1, 0.2, 0.5, 0.6]
  np.testing.assert_allclose(again.boxes, [largest] * 6, rtol=1e-6)


def _tar_gz(path, folder, arcname):
  import tarfile  # pylint: disable=g-import-not-at-top
  with tarfile.open(path, "w:gz") as tar:
    tar.add(folder, arcname=arcname)


def test_tfds_builds_caltech_birds_from_a_cub_archive_in_the_manual_dir(cub_root, tmp_path,
                                                                        monkeypatch):
  # tensorflow-datasets' own caltech_birds2011 builder, end to end: the archives a user
  # downloaded lie in manual_dir, tfds extracts, parses and encodes them into its records,
  # and load_tfds writes the images back out. Only the registered checksums (of the 1.1 GB
  # official archive) are replaced by those of the tiny archive this test writes.
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("cv2")  # tfds decodes the segmentation masks with OpenCV
  base = cub_root / "CUB_200_2011"
  masks = tmp_path / "segmentations"
  folder = data.read_cub(str(cub_root))
  for path, (height, width) in zip(folder.paths, folder.sizes):
    rel = os.path.relpath(path, base / "images")
    os.makedirs(masks / os.path.dirname(rel), exist_ok=True)
    Image.new("L", (int(width), int(height)), 255).save(masks / rel.replace(".jpg", ".png"))
  # tfds pairs the lines of the three files by position, as the official archive orders
  # them (the fixture shuffles the boxes to test read_cub's join on the image id).
  lines = (base / "bounding_boxes.txt").read_text().split("\n")
  (base / "bounding_boxes.txt").write_text("\n".join(sorted(filter(None, lines))) + "\n")
  manual = tmp_path / "manual"
  manual.mkdir()
  _tar_gz(manual / "CUB_200_2011.tgz", base, "CUB_200_2011")
  _tar_gz(manual / "segmentations.tgz", masks, "segmentations")
  builder_cls = tfds.builder_cls("caltech_birds2011")
  urls = sorted(builder_cls.url_infos)
  infos = {url: tfds.core.download.checksums.compute_url_info(manual / builder_cls.url_infos[url].filename)
           for url in urls}
  monkeypatch.setattr(builder_cls, "url_infos", infos)

  out = tmp_path / "materialised"
  ds = data.load_tfds("caltech_birds2011", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                      out_dir=str(out))
  # tfds orders examples its own way: match each to the archive's image by its bytes.
  originals = {}
  for path, label, is_train, box in zip(folder.paths, folder.labels, folder.is_train, folder.boxes):
    with open(path, "rb") as f:
      originals[f.read()] = (int(label), bool(is_train), box)
  assert len(ds.paths) == len(originals) == 4
  for path, label, is_train, box in zip(ds.paths, ds.labels, ds.is_train, ds.boxes):
    with open(path, "rb") as f:
      expected_label, expected_train, expected_box = originals.pop(f.read())  # bytes unchanged
    assert (int(label), bool(is_train)) == (expected_label, expected_train)
    np.testing.assert_allclose(box, expected_box, atol=1e-6)  # tfds normalises like read_cub
  assert ds.num_classes == 200 and ds.class_names[0] == "0"  # tfds's label names
  images = data.cached_images(ds, 8, cache_dir=None, progress=False).images
  assert images.shape == (4, 8, 8, 3)  # the greyscale JPEG decodes to RGB too


def test_tfds_materialised_folder_loads_without_tensorflow(tmp_path, monkeypatch):
  out = tmp_path / "materialised"
  os.makedirs(out / "train")
  for i in range(2):
    (out / "train" / f"{i:06d}.jpg").write_bytes(_jpeg_bytes(10, 8, i))
  manifest = {"name": "stanford_dogs", "version": "0.2.0", "splits": ["train"],
              "class_names": ["a", "b"], "paths": ["train/000000.jpg", "train/000001.jpg"],
              "labels": [0, 1], "is_train": [True, True],
              "objects": [[[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]], [[0.0, 0.0, 1.0, 1.0]]]}
  (out / "manifest.json").write_text(__import__("json").dumps(manifest))
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  ds = data.load_tfds("stanford_dogs", out_dir=str(out), splits=("train",))
  np.testing.assert_allclose(ds.boxes, [[0.1, 0.1, 0.9, 0.8], [0, 0, 1, 1]])
  assert ds.class_names == ("a", "b") and len(ds.paths) == 2


@pytest.mark.parametrize("from_archive", [False, True], ids=["folder", "archive"])
def test_cub_subset_keeps_the_chosen_classes_ids_split_and_boxes(cub_root, tmp_path,
                                                                 from_archive):
  # The official layout in, a CUB-style subset out: chosen classes only, official ids kept, each
  # image shrunk to --max-side with its box scaled, readable by read_cub like the original.
  import subprocess  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from fgir_jax.data import subset  # pylint: disable=g-import-not-at-top
  source = str(cub_root)
  if from_archive:
    source = str(tmp_path / "CUB_200_2011.tgz")
    with tarfile.open(source, "w:gz") as tar:
      tar.add(cub_root / "CUB_200_2011", arcname="CUB_200_2011")
  out = tmp_path / "out"
  assert subset.write_subset(source, str(out), [2], max_side=32, echo=None) == {
      "images": 2, "classes": 1, "train": 1, "test": 1}
  whole, part = data.read_cub(str(cub_root)), data.read_cub(str(out))
  assert [os.path.basename(p) for p in part.paths] == ["b_1.jpg", "b_2.jpg"]
  np.testing.assert_array_equal(part.labels, [1, 1])  # class id 2, as in the whole dataset
  np.testing.assert_array_equal(part.is_train, [True, False])
  np.testing.assert_array_equal(part.sizes, [[16, 32], [30, 30]])  # 64 x 32 shrunk; 30 x 30 kept
  np.testing.assert_allclose(part.boxes, whole.boxes[2:], atol=0.01)  # the same box, scaled
  assert part.class_names == ("class_1", "002.Auklet")  # only the kept classes are named
  # The command line: a second write into the same place is refused, naming it.
  proc = subprocess.run([sys.executable, "-m", "fgir_jax.data.subset", source, str(out),
                         "--classes", "2"], capture_output=True, text=True)
  assert proc.returncode == 2 and "already holds a dataset" in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "fgir_jax.data.subset", source, str(tmp_path / "x"),
                         "--classes", "1-300"], capture_output=True, text=True)
  assert proc.returncode == 2 and "from 1 to 200" in proc.stderr
