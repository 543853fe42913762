"""Image decoding and preprocessing: file -> RGB -> square -> resize -> normalised array.

Mirrors what LLaVA feeds CLIP: `expand2square` with the processor's mean colour, then
CLIPImageProcessor (bicubic resize of the shortest edge, centre crop, rescale, normalise).
Everything a real crawl contains is turned into plain RGB first: palette and alpha images
(composited, because dropping alpha exposes whatever colour hides under transparent
pixels), CMYK, 16-bit greyscale (scaled, because Pillow's own conversion clips at 255),
and EXIF-rotated photos (turned upright, as a viewer shows them).
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from ee_mllm_jax.data.records import BadRecordError

PreprocessMode = Literal["pad", "resize", "crop"]
Background = Literal["white", "mean"]

# Bounds read from the header, before anything is decoded (Pillow's Image.open is lazy): Pillow's
# own bomb guard bounds the pixel count (w * h), not the square that padding builds (max(w, h)^2),
# so a 20000 x 1 PNG of 99 bytes would pass it and then take 1.2 GB to pad.
MAX_SIDE = 16384  # pixels on the longer side (JPEG's own limit is 65535)
MAX_ASPECT = 32.0  # longer side / shorter side
# Padding happens at most at this size: a larger image is first shrunk by an integer box filter
# (Image.reduce), so the pad canvas is at most PAD_MAX_SIDE^2 pixels; images up to this size take
# LLaVA's exact path (pad at full size, then resize).
PAD_MAX_SIDE = 4096


def contained_path(root: str, path: str, *, hint: str = "") -> str:
  """`path` (relative to `root`; an absolute one replaces it) resolved, `..` and symlinks
  followed; BadRecordError("outside_image_root") when that leaves `root`. Training's records and
  eval.py's benchmark files go through this one check."""
  root = os.path.realpath(root)
  resolved = os.path.realpath(os.path.join(root, path))
  if os.path.commonpath([resolved, root]) != root:
    raise BadRecordError("outside_image_root", f"image {path!r} resolves to {resolved}, outside the image "
                         f"directory {root}" + (f" ({hint})" if hint else ""))
  return resolved


def check_header(img: Image.Image, name: str):
  """Refuses, from the header alone, an image whose side or aspect ratio is out of bounds."""
  width, height = img.size
  if width < 1 or height < 1:
    raise BadRecordError("corrupt_image", f"image has no pixels ({width} x {height}): {name}")
  if max(width, height) > MAX_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
    raise BadRecordError("image_too_large", f"image is {width} x {height} pixels, beyond the bounds (longer "
                         f"side <= {MAX_SIDE}, aspect ratio <= {MAX_ASPECT:g}); not decoded: {name}")


def mean_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
  """The processor's mean as an 8-bit RGB colour, truncated as LLaVA's expand2square call does."""
  return tuple(int(m * 255) for m in mean)


def open_image(path: str) -> Image.Image:
  """Decodes `path` fully (so truncation is caught here), EXIF orientation applied."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    raise BadRecordError("missing_image", f"image file not found: {path}") from None
  except OSError as e:
    raise BadRecordError("missing_image", f"image file cannot be read: {path}: {e}") from None
  if size == 0:
    raise BadRecordError("empty_image", f"image file is empty (0 bytes): {path}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        check_header(img, path)
        img.load()
        return ImageOps.exif_transpose(img)
  except BadRecordError:
    raise
  except Image.UnidentifiedImageError:
    raise BadRecordError("not_an_image", f"not an image file: {path}") from None
  except Exception as e:  # truncated data, bad CRC, decompression bomb, codec errors
    raise BadRecordError("corrupt_image", f"corrupt or truncated image: {path}: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
  """Any Pillow mode -> RGB; transparent pixels show `background`."""
  if img.mode == "RGB":
    return img
  if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
    return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
  return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _to_uint8(values: np.ndarray) -> np.ndarray:
  """Greyscale with more than 8 bits -> 0..255, keeping the full range visible."""
  is_float = values.dtype.kind == "f"
  values = values.astype(np.float64)
  if is_float and values.max(initial=0) <= 1.0:
    peak = 1.0  # float images in [0, 1]
  elif values.max(initial=0) <= 255:
    peak = 255.0  # 8-bit data stored in a wide mode
  else:
    peak = 65535.0
  return np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  """Pads the short side equally on both sides (LLaVA's `expand2square`)."""
  width, height = img.size
  if width == height:
    return img
  side = max(width, height)
  square = Image.new(img.mode, (side, side), fill)
  square.paste(img, ((side - width) // 2, (side - height) // 2))
  return square


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
  """CLIPImageProcessor: bicubic resize of the shortest edge to `size`, centre crop."""
  width, height = img.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, *, size: int, mean, std, mode: PreprocessMode = "pad",
               background: Background = "white") -> np.ndarray:
  """A decoded image -> (size, size, 3) float32, normalised with the tower's mean/std."""
  fill = mean_colour(mean)
  img = to_rgb(img, (255, 255, 255) if background == "white" else fill)
  if mode == "pad" and max(img.size) > PAD_MAX_SIDE:  # shrink first, then pad: the canvas stays bounded
    img = img.reduce(-(-max(img.size) // PAD_MAX_SIDE))
  if mode == "pad":
    img = expand_to_square(img, fill)
  if mode == "resize":
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  else:  # after padding the image is square, so this is a plain resize
    img = resize_and_crop(img, size)
  # (x / 255 - mean) / std, folded into one multiply and one subtract, in place.
  std = np.asarray(std, np.float64)
  pixels = np.asarray(img, dtype=np.float32)
  pixels *= (1 / (255 * std)).astype(np.float32)
  pixels -= (np.asarray(mean, np.float64) / std).astype(np.float32)
  return pixels


def load_pixels(path: str, **kwargs) -> np.ndarray:
  """`open_image` + `preprocess`; raises BadRecordError naming the file."""
  img = open_image(path)
  try:
    return preprocess(img, **kwargs)
  except BadRecordError:
    raise
  except Exception as e:  # an exotic mode Pillow cannot convert
    raise BadRecordError("corrupt_image", f"cannot convert image {path} ({img.mode}): {e}") from None


def load_pixels_from_bytes(data: bytes, name: str, **kwargs) -> np.ndarray:
  """`load_pixels` for an image held in memory (e.g. base64 in a benchmark file); `name` is
  what errors call it."""
  import io  # pylint: disable=g-import-not-at-top
  if not data:
    raise BadRecordError("empty_image", f"image is empty (0 bytes): {name}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as img:
        check_header(img, name)
        img.load()
        img = ImageOps.exif_transpose(img)
  except BadRecordError:
    raise
  except Image.UnidentifiedImageError:
    raise BadRecordError("not_an_image", f"not an image: {name}") from None
  except Exception as e:  # truncated data, bad CRC, decompression bomb, codec errors
    raise BadRecordError("corrupt_image", f"corrupt or truncated image: {name}: {e}") from None
  try:
    return preprocess(img, **kwargs)
  except Exception as e:  # an exotic mode Pillow cannot convert
    raise BadRecordError("corrupt_image", f"cannot convert image {name} ({img.mode}): {e}") from None
