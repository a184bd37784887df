"""A synthetic fine-grained dataset: "birds" that differ only in small details.

The project's embedded default data: it needs no download, is made in seconds
with NumPy, and behaves like CUB where it matters for this method — the
classes share one body plan and differ in small parts, the object's box
covers 14-40% of the image, and the background is cluttered with shapes, textures and
loose copies of the very parts that tell classes apart (capped heads, striped
wings, marked patches). Classifying the whole image is therefore clearly
harder than classifying the true-box crop, so a saliency crop has something to
gain.

Body plan (one "bird", in its own frame, unit = body half-length): an
elliptic body, a round head with an eye and a beak, a tail, a wing on the
body, a dark outline. A class is a combination of four small traits:
  crown colour   the cap on top of the head: red, yellow, blue, white, green
  wing stripes   0, 1, 2 or 3 light bars across the wing
  breast marking plain, dot or bar
  tail shape     fan or forked
(120 combinations; `class_traits(k)` lists the ones used by k classes, always
the same ones for the same k). Everything else varies within a class and
carries no label information: body, wing and beak colours, body and head
proportions, beak and tail length, position, scale (box area 14-40% of the
image), mirror, rotation (+-20 degrees), lighting and pixel noise.

Drawing is vectorised over a chunk of images with coordinate grids: each part
is one NumPy expression on a (chunk, h, w) window around it, painted into a
palette-index map (painter's algorithm), and colours are looked up once at
the end. All random draws are made up front from one generator seeded by
`seed`, so the data depends only on the arguments, not on chunking; 2,000
images of 96 x 96 take about 2 s on one CPU core.
"""

from __future__ import annotations

import itertools

import numpy as np

from fgir_jax.data.dataset import Dataset

CROWN_COLOURS = {"red": (215, 35, 30), "yellow": (240, 205, 30), "blue": (35, 85, 225),
                 "white": (248, 248, 244), "green": (35, 165, 65)}
STRIPE_COUNTS = (0, 1, 2, 3)
MARKINGS = ("plain", "dot", "bar")
TAILS = ("fan", "forked")
MAX_CLASSES = len(CROWN_COLOURS) * len(STRIPE_COUNTS) * len(MARKINGS) * len(TAILS)

_STRIPE_RGB = (238, 236, 222)
_MARK_RGB = (30, 22, 18)
_BEAK_RGB = np.array([(232, 180, 40), (70, 66, 60), (205, 105, 40), (190, 190, 170)], np.float32)
# Wing-frame centres of the bars, by stripe count (NaN: no bar).
_STRIPE_POS = np.array(
    [[np.nan] * 3, [0.0, np.nan, np.nan], [-0.21, 0.21, np.nan], [-0.36, 0.0, 0.36]], np.float32)
_TRAIT_SEED = 20240601  # fixes which trait combinations the classes use
_OUTLINE = 0.07  # outline width, body units
_CHUNK = 32  # images drawn together; small enough for the arrays to stay in cache


def class_traits(num_classes: int) -> list[dict]:
  """The traits of classes 0..num_classes-1 (same for every seed and size)."""
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}] (distinct trait combinations), "
                     f"got {num_classes}.")
  combos = list(itertools.product(CROWN_COLOURS, STRIPE_COUNTS, MARKINGS, TAILS))
  order = np.random.default_rng(_TRAIT_SEED).permutation(len(combos))
  keys = ("crown", "stripes", "marking", "tail")
  return [dict(zip(keys, combos[i])) for i in order[:num_classes]]


def class_name(traits: dict) -> str:
  """e.g. "red-crown/2-stripes/dot/forked-tail"."""
  t = traits
  return f"{t['crown']}-crown/{t['stripes']}-stripes/{t['marking']}/{t['tail']}-tail"


def make_synthetic(num_classes: int = 20, per_class: int = 100, size: int = 96,
                   test_fraction: float = 0.4, seed: int = 0, clutter: float = 1.0,
                   return_masks: bool = False):
  """Makes the synthetic fine-grained dataset.

  Args:
    num_classes: number of classes K (at most MAX_CLASSES = 120).
    per_class: images per class (the set is exactly balanced).
    size: image side in pixels (64-128 is the intended range).
    test_fraction: fraction of each class in the test split (the queries).
    seed: non-negative int; the same arguments always give the same data.
    clutter: 0 = plain textured background, 1 = the full clutter (background
      shapes and distractor parts); values in between thin it out.
    return_masks: also return the object masks.

  Returns:
    A `Dataset` with `images` (K * per_class, size, size, 3) uint8, `labels`
    int32 in shuffled order, `is_train` (round((1 - test_fraction) *
    per_class) per class), `boxes` (n, 4) float32 (ymin, xmin, ymax, xmax),
    the tight box of the object's pixels in [0, 1] (pixel edges: a box over
    rows r0..r1 is r0 / size .. (r1 + 1) / size), and `class_names` from the
    traits. With `return_masks`, a tuple (dataset, masks (n, size, size) bool).
  """
  traits = class_traits(num_classes)
  if per_class < 1 or size < 16:
    raise ValueError(f"per_class must be >= 1 and size >= 16, got {per_class} and {size}.")
  if not 0.0 <= test_fraction < 1.0 or not 0.0 <= clutter <= 1.0:
    raise ValueError(f"test_fraction must be in [0, 1) and clutter in [0, 1], "
                     f"got {test_fraction} and {clutter}.")
  rng = np.random.default_rng(seed)
  n = num_classes * per_class
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  is_train = _stratified_train(labels, per_class, test_fraction)
  params = _draw_params(rng, labels, traits, size, clutter)
  images = np.empty((n, size, size, 3), np.uint8)
  masks = np.empty((n, size, size), bool)
  # Drawing birds of similar size together keeps the per-chunk windows tight;
  # the order of drawing does not change any image.
  order = np.argsort(params["scale"], kind="stable")
  for start in range(0, n, _CHUNK):
    rows = order[start:start + _CHUNK]
    images[rows], masks[rows] = _render({k: v[rows] for k, v in params.items()}, size)
  name = f"synthetic-k{num_classes}-n{per_class}-{size}px-c{clutter:g}-s{seed}"
  ds = Dataset(name=name, images=images, labels=labels,
               is_train=is_train, boxes=_mask_boxes(masks),
               class_names=[class_name(t) for t in traits])
  return (ds, masks) if return_masks else ds


def _stratified_train(labels: np.ndarray, per_class: int, test_fraction: float) -> np.ndarray:
  n_train = per_class - int(round(test_fraction * per_class))
  rank = np.empty(len(labels), np.int64)  # position of each image within its class
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    rank[idx] = np.arange(len(idx))
  return rank < max(n_train, 1)


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
  """Tight (ymin, xmin, ymax, xmax) of each mask in pixel-edge units / size."""
  n, h, w = masks.shape
  rows, cols = masks.any(2), masks.any(1)
  r0, r1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
  c0, c1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
  return np.stack([r0 / h, c0 / w, r1 / h, c1 / w], axis=1).astype(np.float32)


# --------------------------------------------------------------------------
# Random parameters of every image (drawn up front, so chunking is irrelevant).


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  """Vectorised HSV in [0, 1] -> RGB in [0, 255], (..., 3) float32."""
  i = np.floor(h * 6).astype(int) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = np.stack([np.stack(c, -1) for c in
                    [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
  return (np.take_along_axis(table, i[None, ..., None], 0)[0] * 255).astype(np.float32)


def _body_colours(rng, shape) -> np.ndarray:
  # Earthy, muted tones: they never pass for a saturated crown colour.
  h = rng.uniform(0.02, 0.16, shape) + rng.choice([0.0, 0.45], shape, p=[0.8, 0.2])
  return _hsv_to_rgb(h % 1.0, rng.uniform(0.1, 0.5, shape), rng.uniform(0.45, 0.82, shape))


def _draw_params(rng, labels, traits, size, clutter) -> dict:
  n = len(labels)
  u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape)).astype(np.float32)
  crown_rgb = np.array(list(CROWN_COLOURS.values()), np.float32)
  t_crown = np.array([list(CROWN_COLOURS).index(t["crown"]) for t in traits])[labels]
  t_stripes = np.array([t["stripes"] for t in traits])[labels]
  t_mark = np.array([MARKINGS.index(t["marking"]) for t in traits])[labels]
  t_fork = np.array([t["tail"] == "forked" for t in traits])[labels]
  p = dict(
      crown=crown_rgb[t_crown], stripe_pos=_STRIPE_POS[t_stripes], mark=t_mark, fork=t_fork,
      body_ry=u(0.5, 0.62), head_r=u(0.36, 0.44), beak_len=u(0.22, 0.45), tail_len=u(0.85, 1.15),
      body=_body_colours(rng, (n,)), wing_shade=u(0.6, 0.8), beak=_BEAK_RGB[rng.integers(0, 4, n)],
      theta=u(-0.35, 0.35), mirror=rng.choice(np.array([-1.0, 1.0], np.float32), n),
      area=u(0.14, 0.38), gain=u(0.85, 1.15),
      noise_seed=rng.integers(0, 2**31, n).astype(np.uint32))
  _place_object(rng, p, size)
  # Background: two-colour wavy texture.
  p.update(bg_a=u(20, 235, 3), bg_b=u(20, 235, 3), bg_f=u(-4, 4, 4) * (2 * np.pi / size),
           bg_phase=u(0, 2 * np.pi, 2))
  # Clutter: background shapes, a third of them in crown colours.
  k = p["scale"]
  shapes = 10
  colour = rng.uniform(0, 255, (n, shapes, 3)).astype(np.float32)
  crowny = rng.random((n, shapes)) < 0.33
  colour[crowny] = crown_rgb[rng.integers(0, 5, crowny.sum())]
  p.update(sh_on=rng.random((n, shapes)) < 0.7 * clutter,
           sh_x=u(0, size, shapes), sh_y=u(0, size, shapes), sh_a=u(0.03, 0.2, shapes) * size,
           sh_b=u(0.03, 0.2, shapes) * size, sh_theta=u(0, np.pi, shapes), sh_rgb=colour)
  # Distractor parts at the object's own scale: a capped head, a striped wing, a marked patch.
  d = 3
  p.update(d_on=rng.random((n, d)) < 0.7 * clutter, d_x=u(0, size, d), d_y=u(0, size, d),
           d_theta=u(-np.pi, np.pi, d), d_scale=k[:, None] * u(0.8, 1.2, d),
           d_body=_body_colours(rng, (n, d)), d_crown=crown_rgb[rng.integers(0, 5, (n, d))],
           d_stripe_pos=_STRIPE_POS[rng.integers(0, 4, (n, d))], d_mark=rng.integers(1, 3, (n, d)))
  return p


def _silhouette_points(p) -> tuple[np.ndarray, np.ndarray]:
  """(n, m) local x, y of points around the outlined silhouette (for the box)."""
  t = np.linspace(0, 2 * np.pi, 48, endpoint=False, dtype=np.float32)
  o = _OUTLINE
  ry, hr = p["body_ry"][:, None], p["head_r"][:, None]
  xs = [np.broadcast_to((1 + o) * np.cos(t), (len(ry), 48)), 0.92 + (hr + o) * np.cos(t)]
  ys = [(ry + o) * np.sin(t), -0.48 + (hr + o) * np.sin(t)]
  beak = _beak_vertices(p)
  tail = _tail_vertices(p)
  for vx, vy in (beak + tail):  # vertex lists; the outline adds ~o around them
    for dx, dy in ((o, o), (o, -o), (-o, o), (-o, -o)):
      xs.append(vx[:, None] + dx)
      ys.append(vy[:, None] + dy)
  return np.concatenate(xs, 1), np.concatenate(ys, 1)


def _beak_vertices(p):
  hr, bl = p["head_r"], p["beak_len"]
  x0 = 0.92 + 0.8 * hr
  y = lambda value: np.full_like(hr, value)
  return [(x0, y(-0.6)), (x0, y(-0.38)), (0.92 + hr + bl, y(-0.47))]


def _tail_vertices(p):
  tl = p["tail_len"]
  return [(np.full_like(tl, -0.6), np.zeros_like(tl)), (-0.6 - tl, np.full_like(tl, -0.34)),
          (-0.6 - tl, np.full_like(tl, 0.34))]


def _place_object(rng, p, size) -> None:
  """Scale from the target box area, then a position that keeps the box inside."""
  lx, ly = _silhouette_points(p)
  c, s, m = np.cos(p["theta"])[:, None], np.sin(p["theta"])[:, None], p["mirror"][:, None]
  px = m * lx * c - ly * s  # image-frame offsets per unit scale (mirror, then rotate)
  py = m * lx * s + ly * c
  x0, x1, y0, y1 = px.min(1), px.max(1), py.min(1), py.max(1)
  scale = size * np.sqrt(p["area"] / ((x1 - x0) * (y1 - y0)))
  scale = np.minimum(scale, 0.94 * size / np.maximum(x1 - x0, y1 - y0))
  left = rng.uniform(0, 1, len(scale)) * (size - scale * (x1 - x0))
  top = rng.uniform(0, 1, len(scale)) * (size - scale * (y1 - y0))
  p.update(scale=scale.astype(np.float32), cx=(left - scale * x0).astype(np.float32),
           cy=(top - scale * y0).astype(np.float32),
           box_px=np.stack([left, left + scale * (x1 - x0), top, top + scale * (y1 - y0)], 1))


# --------------------------------------------------------------------------
# Drawing one chunk.


def _render(p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(b, size, size, 3) uint8 images and (b, size, size) object masks."""
  canvas = _Canvas(len(p["scale"]), size)
  _draw_clutter(canvas, p)
  _draw_distractors(canvas, p)
  mask = _draw_bird(canvas, p)
  # Channels-first while computing: NumPy is slow on a trailing axis of length 3.
  image = canvas.compose(_texture(p, size))
  image *= _col(p["gain"])[:, None]
  image += _hash_noise(p["noise_seed"], size)[:, None] * 5.0
  np.clip(image, 0, 255, out=image)
  return np.round(image).astype(np.uint8).transpose(0, 2, 3, 1), mask


class _Canvas:
  """Painter's algorithm on a palette-index map: one byte per pixel per paint."""

  def __init__(self, b: int, size: int):
    self.size = size
    self.index = np.zeros((b, size, size), np.uint8)  # 0 = background texture
    self.palette = [np.zeros((b, 3), np.float32)]

  def window(self, cx, cy, half_x, half_y) -> "_Window":
    """A per-image window around (cx, cy) (pixels) big enough for +-half."""
    return _Window(self, cx, cy, half_x, half_y)

  def compose(self, background: np.ndarray) -> np.ndarray:
    """(b, 3, size, size) float32: palette colours, `background` where nothing was painted."""
    palette = np.stack(self.palette, 1)  # (b, colours, 3)
    b, colours, _ = palette.shape
    flat = self.index + (np.arange(b, dtype=np.int32) * colours)[:, None, None]
    unpainted = self.index == 0
    for c in range(3):
      channel = np.take(palette[:, :, c].reshape(-1), flat)
      np.copyto(background[:, c], channel, where=~unpainted)
    return background


class _Window:
  """Draws on a (b, wy, wx) window of each image, at a per-image offset.

  Shapes are evaluated only where they can be, which is several times cheaper
  than the whole image; the window keeps the full size of the canvas's grid
  coordinates, so a shape looks the same however its window is placed. A
  window is moved inside the image at the borders: it still covers the part
  of the shape that is in the image.
  """

  def __init__(self, canvas: _Canvas, cx, cy, half_x, half_y):
    size = canvas.size
    self.canvas = canvas
    wx = int(min(size, np.ceil(2 * np.max(half_x)) + 2))
    wy = int(min(size, np.ceil(2 * np.max(half_y)) + 2))
    ox = np.clip(np.floor(cx - wx / 2), 0, size - wx).astype(np.int64)
    oy = np.clip(np.floor(cy - wy / 2), 0, size - wy).astype(np.int64)
    # Windows as views: (b, size - wy + 1, size - wx + 1, wy, wx), indexed per image.
    self.views = np.lib.stride_tricks.sliding_window_view(canvas.index, (wy, wx), axis=(1, 2),
                                                          writeable=True)
    self.pick = (np.arange(len(cx)), oy, ox)
    self.yy = (oy[:, None, None] + np.arange(wy)[None, :, None] + 0.5).astype(np.float32)
    self.xx = (ox[:, None, None] + np.arange(wx)[None, None, :] + 0.5).astype(np.float32)
    self.sub = self.views[self.pick]
    self.offsets = (oy, ox, wy, wx)

  def frame(self, cx, cy, theta, scale=None, mirror=None):
    """The window's pixels in a shape's own frame (rotated, scaled, mirrored)."""
    dx, dy = self.xx - _col(cx), self.yy - _col(cy)
    c, s = np.cos(theta), np.sin(theta)
    if scale is not None:  # fold 1/scale and the mirror into (b,) factors, not the grid
      c, s = c / scale, s / scale
    cu, su = (c, s) if mirror is None else (c * mirror, s * mirror)
    return dx * _col(cu) + dy * _col(su), dy * _col(c) - dx * _col(s)

  def paint(self, mask: np.ndarray, rgb) -> None:
    rgb = np.broadcast_to(np.asarray(rgb, np.float32), (len(self.pick[0]), 3))
    self.canvas.palette.append(rgb)
    np.copyto(self.sub, len(self.canvas.palette) - 1, where=mask)

  def close(self) -> None:
    self.views[self.pick] = self.sub

  def full(self, mask: np.ndarray) -> np.ndarray:
    """A window mask as a (b, size, size) mask of the whole image."""
    out = np.zeros(self.canvas.index.shape, bool)
    _, _, wy, wx = self.offsets
    views = np.lib.stride_tricks.sliding_window_view(out, (wy, wx), axis=(1, 2), writeable=True)
    views[self.pick] = mask
    return out


def _col(a):
  """Per-image values as (b, 1, 1) for broadcasting against grids (scalars stay)."""
  a = np.asarray(a, np.float32)
  return a[:, None, None] if a.ndim == 1 else a


def _ellipse(u, v, cx, cy, rx, ry):
  return ((u - cx) * (1.0 / rx)) ** 2 + ((v - cy) * (1.0 / ry)) ** 2 <= 1.0


def _triangle(u, v, verts, grow=0.0):
  """Inside a triangle given (x, y) vertex pairs (scalars or (b,) arrays), grown by `grow`."""
  verts = [(np.asarray(x, np.float32), np.asarray(y, np.float32)) for x, y in verts]
  (x0, y0), (x1, y1), (x2, y2) = verts
  sign = np.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
  inside = True
  for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
    # Signed distance to the edge's line as a*u + b*v + c with (b,) coefficients.
    ex, ey = bx - ax, by - ay
    norm = sign / np.sqrt(ex * ex + ey * ey)
    a, b, c = -ey * norm, ex * norm, (ey * ax - ex * ay) * norm + grow
    inside = inside & (u * _col(a) + v * _col(b) + _col(c) >= 0)
  return inside


def _texture(p, size) -> np.ndarray:
  """Two crossed sine gratings blending two colours, (b, 3, size, size)."""
  grid = np.arange(size, dtype=np.float32) + 0.5
  f, ph = p["bg_f"], p["bg_phase"]
  t = 0.5
  for k in range(2):
    # sin(fx x + fy y + ph) = sin(fx x + ph) cos(fy y) + cos(fx x + ph) sin(fy y):
    # no per-pixel sine.
    ax = f[:, 2 * k, None] * grid + ph[:, k, None]
    ay = f[:, 2 * k + 1, None] * grid
    t = t + 0.25 * (np.cos(ay)[:, :, None] * np.sin(ax)[:, None, :]
                    + np.sin(ay)[:, :, None] * np.cos(ax)[:, None, :])
  a, b = p["bg_a"][:, :, None, None], p["bg_b"][:, :, None, None]
  return a + (b - a) * t[:, None]


def _hash_noise(seeds: np.ndarray, size: int) -> np.ndarray:
  """Per-pixel noise in [-1, 1] from a counter-based hash (independent of chunking)."""
  counter = np.arange(size * size, dtype=np.uint32).reshape(1, size, size)
  h = counter * np.uint32(0x9E3779B1) ^ seeds.astype(np.uint32)[:, None, None]
  for mult in (0x85EBCA6B, 0xC2B2AE35):  # murmur3's finaliser
    h ^= h >> np.uint32(16)
    h *= np.uint32(mult)
  h ^= h >> np.uint32(16)
  return (h >> np.uint32(8)).astype(np.float32) / float(1 << 23) - 1.0


def _draw_clutter(canvas, p) -> None:
  # Slot j always holds the same kind of shape (j % 3), so each slot costs one mask.
  for j in range(p["sh_on"].shape[1]):
    a, b = p["sh_a"][:, j], p["sh_b"][:, j]
    half = np.sqrt(a * a + b * b) + 1
    win = canvas.window(p["sh_x"][:, j], p["sh_y"][:, j], half, half)
    u, v = win.frame(p["sh_x"][:, j], p["sh_y"][:, j], p["sh_theta"][:, j])
    if j % 3 == 0:
      shape = _ellipse(u, v, 0.0, 0.0, _col(a), _col(b))
    elif j % 3 == 1:
      shape = (np.abs(u) <= _col(a)) & (np.abs(v) <= _col(b))
    else:
      shape = _triangle(u, v, [(-a, b), (a, b), (np.zeros_like(a), -b)])
    win.paint(shape & _col(p["sh_on"][:, j]).astype(bool), p["sh_rgb"][:, j])
    win.close()


def _draw_distractors(canvas, p) -> None:
  """Loose parts drawn like the bird's own: confusing unless one looks at the bird."""
  for j in range(p["d_on"].shape[1]):
    on = _col(p["d_on"][:, j]).astype(bool)
    x, y, scale = p["d_x"][:, j], p["d_y"][:, j], p["d_scale"][:, j]
    win = canvas.window(x, y, 0.65 * scale + 1, 0.65 * scale + 1)
    u, v = win.frame(x, y, p["d_theta"][:, j], scale)
    body = p["d_body"][:, j]
    if j == 0:  # a capped head with an eye
      head = _ellipse(u, v, 0.0, 0.0, 0.36, 0.36)
      win.paint(_ellipse(u, v, 0.0, 0.0, 0.42, 0.42) & on, body * 0.45)
      win.paint(head & on, body)
      win.paint(head & (v < -0.05) & on, p["d_crown"][:, j])
      win.paint(_ellipse(u, v, 0.14, 0.0, 0.07, 0.07) & on, (15, 15, 15))
    elif j == 1:  # a wing with light bars
      wing = _ellipse(u, v, 0.0, 0.0, 0.62, 0.3)
      win.paint(wing & on, body * 0.7)
      win.paint(_stripes(u, v, p["d_stripe_pos"][:, j]) & wing & on, _STRIPE_RGB)
    else:  # a body-coloured patch with a breast marking
      win.paint(_ellipse(u, v, 0.0, 0.0, 0.55, 0.4) & on, body)
      win.paint(_marking(u, v, p["d_mark"][:, j], 0.0, 0.0) & on, _MARK_RGB)
    win.close()


def _stripes(u, v, pos) -> np.ndarray:
  """Bars across the u axis at wing-frame positions `pos` (b, 3); NaN = no bar."""
  out = False
  for i in range(pos.shape[1]):
    centre = _col(np.nan_to_num(pos[:, i], nan=1e6))
    out = out | (np.abs(u - centre) <= 0.08)
  return out


def _marking(u, v, kind, cx, cy) -> np.ndarray:
  """kind (b,): 0 none, 1 dot, 2 diagonal bar, centred at (cx, cy)."""
  kind = _col(kind)
  dot = _ellipse(u, v, cx, cy, 0.17, 0.17)
  c, s = np.float32(np.cos(0.5)), np.float32(np.sin(0.5))
  bu, bv = (u - cx) * c + (v - cy) * s, (v - cy) * c - (u - cx) * s
  bar = (np.abs(bu) <= 0.26) & (np.abs(bv) <= 0.075)
  return ((kind == 1) & dot) | ((kind == 2) & bar)


def _draw_bird(canvas, p) -> np.ndarray:
  """Paints the bird; returns its (b, h, w) mask (outline included)."""
  x0, x1, y0, y1 = p["box_px"].T  # the outlined silhouette's extent, pixels
  win = canvas.window((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 + 1, (y1 - y0) / 2 + 1)
  u, v = win.frame(p["cx"], p["cy"], p["theta"], p["scale"], p["mirror"])
  o = _OUTLINE
  ry, hr, fork = _col(p["body_ry"]), _col(p["head_r"]), _col(p["fork"]).astype(bool)
  body_rgb = p["body"]
  tail_len = p["tail_len"]
  notch_x = -0.6 - tail_len
  y = lambda value: np.full_like(tail_len, value)
  notch = [(notch_x - 0.02, y(-0.24)), (notch_x - 0.02, y(0.24)), (notch_x + 0.55, y(0.0))]
  tail = _triangle(u, v, _tail_vertices(p))
  tail_outline = _triangle(u, v, _tail_vertices(p), o) & ~(fork & _triangle(u, v, notch, -o))
  tail &= ~(fork & _triangle(u, v, notch))
  silhouette = (_ellipse(u, v, 0.0, 0.0, 1 + o, ry + o)
                | _ellipse(u, v, 0.92, -0.48, hr + o, hr + o)
                | tail_outline | _triangle(u, v, _beak_vertices(p), o))
  win.paint(silhouette, body_rgb * 0.4)
  win.paint(tail, body_rgb * 0.85)
  win.paint(_ellipse(u, v, 0.0, 0.0, 1.0, ry), body_rgb)
  # The wing: a darker ellipse tilted a little, with the class's bars.
  wc, ws = np.float32(np.cos(-0.12)), np.float32(np.sin(-0.12))
  wu, wv = (u + 0.1) * wc + (v + 0.02) * ws, (v + 0.02) * wc - (u + 0.1) * ws
  wing = _ellipse(wu, wv, 0.0, 0.0, 0.62, 0.3)
  win.paint(wing, body_rgb * p["wing_shade"][:, None])
  win.paint(wing & _stripes(wu, wv, p["stripe_pos"]), _STRIPE_RGB)
  win.paint(_marking(u, v, p["mark"], 0.5, 0.2), _MARK_RGB)
  head = _ellipse(u, v, 0.92, -0.48, hr, hr)
  win.paint(head, body_rgb)
  win.paint(head & (v < -0.48 - 0.15 * hr), p["crown"])
  win.paint(_triangle(u, v, _beak_vertices(p)), p["beak"])
  win.paint(_ellipse(u, v, 0.92 + 0.45 * hr, -0.48, 0.07, 0.07), (15, 15, 15))
  win.close()
  return win.full(silhouette)
