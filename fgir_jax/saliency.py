"""Saliency crop (paper step 1): feature maps -> saliency maps -> boxes -> crops.

Boxes are normalised `(ymin, xmin, ymax, xmax)` in [0, 1], as tfds writes them
and `data.read_cub` returns them; a box covers the pixels
`[ymin*H, ymax*H) x [xmin*W, xmax*W)` of an H x W image.

Pipeline (PAPER.md step 1 and its Decision):

1. `saliency_maps`: channel mean of the network's last feature map, min-max
   scaled per image to [0, 1] (the paper's 0..255 grey image divided by 255).
   A constant map carries no location and becomes all zeros, so no pixel
   passes any threshold and its box is the full image (see 2.).
2. `boxes_from_maps`: the map is upsampled bilinearly to the image grid
   (`image_size`), pixels with value > alpha are kept (alpha=0.4 keeps
   (0.4, 1], the paper's (102, 255] on the 0..255 scale), and the box is the
   bounding box of the largest 4-connected component of kept pixels
   (mode="largest") or of all kept pixels (mode="all"), grown by `margin`
   times its own height/width on each side and clipped to the image.
   A map with no kept pixel gives the full image (0, 0, 1, 1).
3. `crop_and_resize`: the cached uint8 images cropped to the boxes and
   resized bilinearly, ready to replace the uncropped cache.
4. `iou`, `corloc` against the true boxes; `plot_crops` draws the paper's
   Fig. 6 (boxes at several alpha beside the true ones).

Connected components run either on the device (`label_components`: jitted
label propagation with hooking and pointer jumping) or on the host
(`scipy.ndimage.label`, one C call per chunk). `method="auto"` takes scipy on
a CPU backend, where it is about 10-20x faster (2-core CPU, 8x8 maps
upsampled to 299x299: scipy ~220-500 maps/s, the device loop ~24 maps/s),
and the device version on accelerators or under `jit`. Both give the same
boxes: a tie for the largest component goes to the one whose first pixel
comes first in row-major order. Components are found on the upsampled grid,
not on the small map: thresholding a bilinearly upsampled map can join or
split regions that the coarse grid does not, so the two are not equivalent.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import _validate
from fgir_jax.data import augment

MODES = ("largest", "all")
METHODS = ("auto", "jax", "scipy")
DEFAULT_MARGIN = 0.05
FULL_BOX = (0.0, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------------------
# Maps.

def saliency_maps(feature_map):
  """(n, h, w, c) feature map -> (n, h, w) float32 saliency in [0, 1].

  The channel mean, min-max scaled per image. A map whose range is below
  1e-6 of its largest magnitude counts as constant and becomes all zeros
  (scaling it would only amplify rounding noise), so its box is the full image.
  """
  _validate.check_ndim(feature_map, 4, "feature_map", "a 4-d array (n, h, w, channels)")
  return _saliency_maps(feature_map)


@jax.jit
def _saliency_maps(feature_map):
  m = jnp.mean(jnp.asarray(feature_map, jnp.float32), axis=-1)
  lo = jnp.min(m, axis=(1, 2), keepdims=True)
  hi = jnp.max(m, axis=(1, 2), keepdims=True)
  span = hi - lo
  scale = jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  flat = span <= 1e-6 * scale + jnp.finfo(jnp.float32).tiny
  return jnp.where(flat, 0.0, (m - lo) / jnp.where(flat, 1.0, span))


def upsample_maps(maps, image_size):
  """(n, h, w) -> (n, H, W) float32, bilinear with half-pixel centres (edges repeat)."""
  maps = jnp.asarray(maps, jnp.float32)
  if tuple(maps.shape[1:]) == tuple(image_size):
    return maps
  # Same convention as augment.resize; scale_and_translate's small matmuls
  # beat a gather when the source map is tiny (3x on CPU for 8x8 -> 299x299).
  return jax.image.resize(maps, maps.shape[:1] + tuple(image_size), "linear", antialias=False)


# ---------------------------------------------------------------------------
# Connected components.

def _neighbour_min(lab, big):
  """Min over each pixel and its 4 neighbours; `big` outside the image."""
  pad = jnp.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=big)
  return jnp.minimum(
      jnp.minimum(jnp.minimum(pad[:, :-2, 1:-1], pad[:, 2:, 1:-1]),
                  jnp.minimum(pad[:, 1:-1, :-2], pad[:, 1:-1, 2:])), lab)


@jax.jit
def label_components(mask):
  """4-connected components of (n, H, W) bool masks, on the device.

  Returns (n, H, W) int32: each kept pixel gets the row-major index of the
  first pixel of its component; background gets H*W.

  Label propagation with hooking and pointer jumping (the "label
  equivalence" scheme of GPU labelling): a label is the index of a pixel of
  the same component, never larger than the pixel's own index. Each step
  (1) takes the smallest label among each kept pixel's 4-neighbours, (2)
  hooks it onto the pixel's current root (scatter-min, so whole trees merge
  at once) and (3) follows labels as pointers twice. Plain propagation needs
  about one step per pixel of component diameter (286 steps for blobs at
  299 px); this converges in 5-10. The loop runs until nothing changes.
  """
  n, h, w = mask.shape
  big = h * w
  lab = jnp.where(mask, jnp.arange(big, dtype=jnp.int32).reshape(1, h, w), big).reshape(n, big)
  rows = jnp.arange(n)[:, None]

  def jump(flat):
    # Background (== big) points past the end: clip for the gather, re-mask.
    return jnp.where(flat < big, flat[rows, jnp.minimum(flat, big - 1)], big)

  def body(state):
    flat, _ = state
    nbr = jnp.where(mask, _neighbour_min(flat.reshape(n, h, w), big), big).reshape(n, big)
    new = flat.at[rows, flat].min(nbr, mode="drop")  # hook roots; background dropped
    new = jump(jump(jnp.minimum(new, nbr)))
    return new, jnp.any(new != flat)

  lab, _ = jax.lax.while_loop(lambda s: s[1], body, (lab, jnp.array(True)))
  return lab.reshape(n, h, w)


def _box_of_mask(mask):
  """(n, H, W) bool -> (n, 4) int32 pixel box (r0, c0, r1, c1) of the True pixels.

  r1, c1 are one past the last kept row/column; (0, 0, H, W) if none is kept.
  """
  n, h, w = mask.shape
  rows = jnp.any(mask, axis=2)
  cols = jnp.any(mask, axis=1)
  box = jnp.stack([jnp.argmax(rows, axis=1), jnp.argmax(cols, axis=1),
                   h - jnp.argmax(rows[:, ::-1], axis=1), w - jnp.argmax(cols[:, ::-1], axis=1)], axis=1)
  full = jnp.array([0, 0, h, w])
  return jnp.where(rows.any(axis=1)[:, None], box, full).astype(jnp.int32)


def _largest_mask(lab):
  """Pixels of the largest component (ties: the smallest label) of each image."""
  n, h, w = lab.shape
  big = h * w
  flat = lab.reshape(n, big)
  counts = jnp.zeros((n, big + 1), jnp.int32).at[jnp.arange(n)[:, None], flat].add(1)
  best = jnp.argmax(counts[:, :big], axis=1)
  return lab == best[:, None, None]


@functools.partial(jax.jit, static_argnames=("image_size",))
def _kept(maps, alpha, *, image_size):
  # Strictly greater: alpha=0.4 keeps (0.4, 1] as the paper keeps (102, 255].
  return upsample_maps(maps, image_size) > alpha


@functools.partial(jax.jit, static_argnames=("image_size", "mode"))
def _device_boxes(maps, alpha, *, image_size, mode):
  kept = _kept(maps, alpha, image_size=image_size)
  if mode == "largest":
    kept = _largest_mask(label_components(kept))
  return _box_of_mask(kept)


def _scipy_largest_boxes(kept: np.ndarray) -> np.ndarray:
  """Pixel boxes (as `_box_of_mask`) of the largest 4-connected component, with scipy (host)."""
  from scipy import ndimage  # a dependency of jax itself
  n, h, w = kept.shape
  # One C call for the whole chunk: 4-connectivity inside each image, none
  # across images.
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
  lab, num = ndimage.label(kept, structure=structure)
  boxes = np.tile(np.array([0, 0, h, w], np.int32), (n, 1))
  if num == 0:
    return boxes
  sizes = np.bincount(lab.ravel(), minlength=num + 1)[1:]
  slices = ndimage.find_objects(lab)
  img = np.array([s[0].start for s in slices])
  # Labels grow in row-major order of the first pixel, so within an image the
  # first maximum is the component that starts first (same tie rule as jax).
  order = np.lexsort((np.arange(num), -sizes, img))
  first = np.ones(num, bool)
  first[1:] = img[order[1:]] != img[order[:-1]]
  for label in order[first]:
    s = slices[label]
    boxes[img[label]] = (s[1].start, s[2].start, s[1].stop, s[2].stop)
  return boxes


@functools.partial(jax.jit, static_argnames=("image_size",))
def _normalise(pix_boxes, margin, *, image_size):
  """Pixel boxes -> normalised boxes grown by `margin` x their own side, clipped to [0, 1].

  The full-image box (no kept pixel) stays the full image.
  """
  h, w = image_size
  b = pix_boxes.astype(jnp.float32) / jnp.array([h, w, h, w], jnp.float32)
  dy = margin * (b[:, 2] - b[:, 0])
  dx = margin * (b[:, 3] - b[:, 1])
  grown = jnp.stack([b[:, 0] - dy, b[:, 1] - dx, b[:, 2] + dy, b[:, 3] + dx], axis=1)
  return jnp.clip(grown, 0.0, 1.0)


def _check_box_args(maps, alpha, mode, image_size, margin, method):
  shape = _validate.check_ndim(maps, 3, "maps", "a 3-d array (n, h, w) of saliency maps")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(f"maps must have positive height and width, got shape {shape}.")
  try:
    alpha = float(alpha)
  except (TypeError, ValueError) as e:
    raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}.") from e
  if not 0.0 <= alpha < 1.0:
    raise ValueError(f"alpha must be in [0, 1) (the threshold on maps scaled to [0, 1]), got {alpha}.")
  _validate.check_choice(mode, MODES, "mode")
  _validate.check_choice(method, METHODS, "method")
  if image_size is None:
    image_size = shape[1:]
  else:
    image_size = augment.to_hw(image_size, "image_size")
  margin = float(margin)
  if not 0.0 <= margin <= 1.0 or math.isnan(margin):
    raise ValueError(f"margin is a fraction of the box side and must be in [0, 1], got {margin}.")
  return alpha, tuple(image_size), margin


def boxes_from_maps(maps, alpha=0.4, mode="largest", *, image_size=None,
                    margin=DEFAULT_MARGIN, method="auto", batch_size=128):
  """Saliency maps -> object boxes (the contract of DESIGN.md).

  Args:
    maps: (n, h, w) saliency maps in [0, 1] (`saliency_maps`); the
      threshold applies to the values as given.
    alpha: threshold in [0, 1); pixels with value > alpha are kept.
    mode: "largest" (bounding box of the largest 4-connected component of
      kept pixels) or "all" (bounding box of every kept pixel).
    image_size: (H, W) (or an int) of the image grid the map is upsampled to
      bilinearly before thresholding (PAPER decision: the image size, e.g.
      299); None thresholds the map on its own grid.
    margin: each side of the box moves out by `margin` times the box's height
      (top/bottom) or width (left/right), then the box is clipped to [0, 1].
    method: connected components with "jax" (on the device, jit-compatible),
      "scipy" (on the host) or "auto" (scipy on a CPU backend with concrete
      inputs, else jax). Same boxes either way.
    batch_size: maps processed per chunk, to bound memory at image size.

  Returns:
    (n, 4) float32 normalised (ymin, xmin, ymax, xmax); (0, 0, 1, 1) where no
    pixel is kept. A jax array.
  """
  alpha, image_size, margin = _check_box_args(maps, alpha, mode, image_size, margin, method)
  concrete = _validate.is_concrete(maps)
  if method == "scipy" and not concrete:
    raise ValueError('method="scipy" runs on the host and cannot be traced; use method="jax" under jit.')
  if method == "auto":
    method = "scipy" if concrete and jax.default_backend() == "cpu" else "jax"
  if not concrete:  # under jit: one chunk, all on the device
    return _normalise(_device_boxes(maps, alpha, image_size=image_size, mode=mode), margin,
                      image_size=image_size)
  maps = np.asarray(maps, np.float32)
  n = len(maps)
  chunk_size = max(1, min(int(batch_size), n))
  out = []
  for start in range(0, n, chunk_size):
    chunk = maps[start:start + chunk_size]
    real = len(chunk)
    # Pad the last chunk to the chunk size so it reuses the compiled functions.
    chunk = np.pad(chunk, ((0, chunk_size - real), (0, 0), (0, 0)))
    if method == "scipy" and mode == "largest":
      boxes = _scipy_largest_boxes(np.asarray(_kept(chunk, alpha, image_size=image_size)))
    else:
      boxes = _device_boxes(chunk, alpha, image_size=image_size, mode=mode)
    out.append(_normalise(jnp.asarray(boxes), margin, image_size=image_size)[:real])
  return jnp.concatenate(out) if out else jnp.zeros((0, 4), jnp.float32)


# ---------------------------------------------------------------------------
# Boxes against true boxes.

def _check_boxes(boxes, name: str) -> tuple[int, int]:
  what = "an (n, 4) array of (ymin, xmin, ymax, xmax) boxes"
  shape = _validate.check_ndim(boxes, 2, name, what)
  if shape[1] != 4:
    raise ValueError(f"{name} must be {what}, got shape {shape}.")
  return shape


def _check_pair(pred, true):
  n = _check_boxes(pred, "pred")[0]
  m = _check_boxes(true, "true")[0]
  if n != m:
    raise ValueError(f"pred has {n} boxes but true has {m}; give one predicted box per true box.")


@jax.jit
def _iou(pred, true):
  pred = jnp.asarray(pred, jnp.float32)
  true = jnp.asarray(true, jnp.float32)
  area = lambda b: jnp.maximum(b[:, 2] - b[:, 0], 0) * jnp.maximum(b[:, 3] - b[:, 1], 0)
  ih = jnp.maximum(jnp.minimum(pred[:, 2], true[:, 2]) - jnp.maximum(pred[:, 0], true[:, 0]), 0)
  iw = jnp.maximum(jnp.minimum(pred[:, 3], true[:, 3]) - jnp.maximum(pred[:, 1], true[:, 1]), 0)
  inter = ih * iw
  union = area(pred) + area(true) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def iou(pred, true):
  """Intersection over union of paired boxes: (n, 4), (n, 4) -> (n,) float32.

  Boxes are (ymin, xmin, ymax, xmax) in any common unit; two empty boxes
  have IoU 0.
  """
  _check_pair(pred, true)
  return _iou(pred, true)


def corloc(pred, true, threshold=0.5) -> float:
  """Correct localisation: the fraction of images whose IoU is > threshold.

  Strictly greater, as PASCAL VOC and the CorLoc literature (Deselaers et
  al. 2010) count a hit; this matters for boxes quantised to a coarse map
  grid, where IoU exactly 0.5 happens.
  """
  _check_pair(pred, true)
  threshold = float(threshold)
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"threshold must be in [0, 1), got {threshold}.")
  if np.shape(pred)[0] == 0:
    raise ValueError("corloc needs at least one box.")
  return float(jnp.mean(_iou(pred, true) > threshold))


# ---------------------------------------------------------------------------
# Cropping.

@functools.partial(jax.jit, static_argnames=("out_size",))
def _crop_and_resize(images, boxes, *, out_size):
  n, h, w, _ = images.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  pix = jnp.stack([boxes[:, 0] * h, boxes[:, 1] * w,
                   (boxes[:, 2] - boxes[:, 0]) * h, (boxes[:, 3] - boxes[:, 1]) * w], axis=1)
  out = augment.resample_boxes(images, pix, out_size)
  if images.dtype == jnp.uint8:
    out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
  return out


def crop_and_resize(images, boxes, out_size, *, batch_size=256):
  """Crops each image to its box and resizes it bilinearly.

  Args:
    images: (n, H, W, c) uint8 or float (e.g. the decode cache).
    boxes: (n, 4) normalised (ymin, xmin, ymax, xmax).
    out_size: int or (out_h, out_w).
    batch_size: images per jitted call (bounds device memory for a cache).

  Returns:
    (n, out_h, out_w, c), uint8 (rounded) for uint8 input, else float32.
    NumPy for NumPy input, a jax array for jax input.
  """
  n = _validate.check_ndim(images, 4, "images", "a 4-d array (n, h, w, channels)")[0]
  m = _check_boxes(boxes, "boxes")[0]
  if n != m:
    raise ValueError(f"images has {n} entries but boxes has {m}; give one box per image.")
  out_size = augment.to_hw(out_size, "out_size")
  if not isinstance(images, np.ndarray):
    return _crop_and_resize(images, boxes, out_size=out_size)
  boxes = np.asarray(boxes, np.float32)
  dtype = np.uint8 if images.dtype == np.uint8 else np.float32
  out = np.empty((n,) + out_size + images.shape[3:], dtype)
  size = max(1, min(int(batch_size), n))
  for s in range(0, n, size):
    real = min(size, n - s)
    # The last chunk is padded (edge rows) so it reuses the compiled function.
    take = np.minimum(np.arange(s, s + size), n - 1)
    out[s:s + real] = np.asarray(_crop_and_resize(images[take], boxes[take], out_size=out_size))[:real]
  return out


# ---------------------------------------------------------------------------
# Figure (paper Fig. 6).

def plot_crops(images, maps, true_boxes=None, alphas=(0.2, 0.3, 0.4, 0.5, 0.6), path="crops.png",
               *, mode="largest", margin=DEFAULT_MARGIN, cell_inches=2.0, dpi=100):
  """Saves a grid: one row per image; the saliency map, then the box at each alpha.

  Column 0 shows the image with its saliency map overlaid; column j > 0 the
  image with the predicted box at alphas[j-1] (red) and the true box (green,
  when given), titled with alpha and the IoU; a legend names both colours. The PNG is
  (1 + len(alphas)) * cell_inches * dpi pixels wide and
  n * cell_inches * dpi high.

  Args:
    images: (n, H, W, 3) uint8.
    maps: (n, h, w) saliency maps in [0, 1].
    true_boxes: optional (n, 4) normalised boxes.
    alphas: thresholds to show.
    path: output PNG path.

  Returns:
    `path`.
  """
  n, h, w, _ = _validate.check_ndim(images, 4, "images", "a 4-d array (n, h, w, 3)")
  mshape = _validate.check_ndim(maps, 3, "maps", "a 3-d array (n, h, w)")
  if mshape[0] != n:
    raise ValueError(f"images has {n} entries but maps has {mshape[0]}; give one map per image.")
  if true_boxes is not None and _check_boxes(true_boxes, "true_boxes")[0] != n:
    raise ValueError(f"true_boxes must have one box per image ({n}).")
  alphas = tuple(float(a) for a in alphas)
  if n == 0 or not alphas:
    raise ValueError("plot_crops needs at least one image and one alpha.")
  preds = [np.asarray(boxes_from_maps(maps, a, mode, image_size=(h, w), margin=margin)) for a in alphas]
  ious = [None if true_boxes is None else np.asarray(iou(p, true_boxes)) for p in preds]
  big_maps = np.asarray(upsample_maps(maps, (h, w)))

  import matplotlib  # lazily: only the figure needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  cols = 1 + len(alphas)
  fig, axes = plt.subplots(n, cols, figsize=(cols * cell_inches, n * cell_inches), dpi=dpi,
                           squeeze=False)
  images = np.asarray(images)

  def draw(ax, box, colour):
    y0, x0, y1, x1 = np.asarray(box, float) * [h, w, h, w]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=colour, linewidth=1.5))

  for i in range(n):
    axes[i, 0].imshow(images[i])
    axes[i, 0].imshow(big_maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[i, 0].set_title("saliency", fontsize=7)
    for j, a in enumerate(alphas):
      ax = axes[i, j + 1]
      ax.imshow(images[i])
      if true_boxes is not None:
        draw(ax, np.asarray(true_boxes)[i], "lime")
      draw(ax, preds[j][i], "red")
      title = f"alpha={a:g}" + ("" if ious[j] is None else f" IoU={ious[j][i]:.2f}")
      ax.set_title(title, fontsize=7)
  for ax in axes.ravel():
    ax.set_axis_off()
  legend = [Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", linewidth=1.5,
                      label="saliency box (predicted at the column's alpha)")]
  if true_boxes is not None:
    legend.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="lime", linewidth=1.5,
                            label="true box (the dataset's annotation)"))
  # The legend takes a strip at the top that grows with the figure's height.
  top = 1.0 - 0.45 / (n * cell_inches)
  fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=7, frameon=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top - 0.05 / n, wspace=0.04,
                      hspace=0.15)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
