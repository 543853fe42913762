"""Image decoding and preprocessing on real files."""

import os

import numpy as np
import pytest
from PIL import Image

from ee_mllm_jax.config import CLIP_MEAN, CLIP_STD
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.data.records import BadRecordError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def saved(img, path, **kwargs):
  img.save(path, **kwargs)
  return image_lib.open_image(str(path))


def test_palette_image_keeps_its_colours(tmp_path):
  img = Image.new("RGB", (8, 8), RED)
  img.paste(BLUE, (0, 0, 4, 8))
  rgb = image_lib.to_rgb(saved(img.convert("P"), tmp_path / "p.png"))
  assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == BLUE and rgb.getpixel((7, 0)) == RED


def test_transparent_palette_pixels_show_the_background(tmp_path):
  img = Image.new("P", (4, 4), 1)
  img.putpalette([0, 0, 0, *RED] + [0] * 762)
  img.paste(0, (0, 0, 2, 4))
  loaded = saved(img, tmp_path / "t.png", transparency=0)
  assert image_lib.to_rgb(loaded).getpixel((0, 0)) == WHITE  # black under transparency
  assert image_lib.to_rgb(loaded).getpixel((3, 0)) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("background", ["white", "mean"])
def test_alpha_is_composited_on_white_or_the_mean_colour(tmp_path, mode, background):
  img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
  img.paste((200, 200, 200, 255), (2, 0, 4, 4))
  img.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
  loaded = saved(img.convert(mode), tmp_path / "a.png")
  fill = WHITE if background == "white" else image_lib.mean_colour(CLIP_MEAN)
  rgb = image_lib.to_rgb(loaded, fill)
  assert rgb.getpixel((0, 0)) == fill
  assert rgb.getpixel((3, 3)) == (200, 200, 200)
  assert all(abs(c - f / 2) <= 1.5 for c, f in zip(rgb.getpixel((2, 0)), fill))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
  img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
  rgb = image_lib.to_rgb(saved(img, tmp_path / "c.jpg", quality=95))
  r, g, b = rgb.getpixel((8, 8))
  assert rgb.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16_bit_greyscale_uses_the_full_range(tmp_path):
  values = np.array([[0, 1000, 32896, 65535]], np.uint16)
  loaded = saved(Image.fromarray(values), tmp_path / "g16.png")  # a 16-bit PNG
  assert loaded.mode in ("I;16", "I")
  row = np.asarray(image_lib.to_rgb(loaded))[0, :, 0]
  np.testing.assert_array_equal(row, [0, 4, 128, 255])  # Pillow's own convert clips at 255


def test_32_bit_integer_image_with_8_bit_values_is_unchanged():
  img = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(img))[0, :, 1], [0, 7, 255])


def test_exif_rotation_is_applied(tmp_path):
  # Stored landscape, red top half; orientation 6 means "rotate 90 clockwise to view".
  img = Image.new("RGB", (40, 20), BLUE)
  img.paste(RED, (0, 0, 40, 10))
  exif = Image.Exif()
  exif[0x0112] = 6
  img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
  upright = np.asarray(image_lib.open_image(str(tmp_path / "rot.jpg")).convert("RGB")).astype(int)
  assert upright.shape == (40, 20, 3)  # portrait now
  left, right = upright[:, :8].mean((0, 1)), upright[:, 12:].mean((0, 1))
  assert right[0] > 200 and right[2] < 60  # red moved to the right
  assert left[2] > 200 and left[0] < 60


def test_pad_to_square_fills_with_the_mean_colour():
  img = Image.new("RGB", (40, 20), RED)
  square = image_lib.expand_to_square(img, image_lib.mean_colour(CLIP_MEAN))
  assert square.size == (40, 40)
  pixels = np.asarray(square)
  np.testing.assert_array_equal(pixels[0, 0], [122, 116, 104])  # int(mean * 255), as LLaVA
  assert (pixels[:10] == [122, 116, 104]).all() and (pixels[30:] == [122, 116, 104]).all()
  assert (pixels[10:30] == RED).all()
  # After normalisation the padding is (almost exactly) zero: the mean colour.
  out = image_lib.preprocess(img, size=32, mean=CLIP_MEAN, std=CLIP_STD, mode="pad")
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  assert np.abs(out[:4]).max() < 0.02 and np.abs(out[-4:]).max() < 0.02


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (333, 500), (64, 64)])
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_matches_the_hf_clip_processor(size, mode):
  transformers = pytest.importorskip("transformers")
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1] + (3,), dtype=np.uint8))
  if mode == "pad":  # LLaVA: expand2square(img, tuple(int(x * 255) for x in mean)), then the processor
    side = max(img.size)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    reference_input = square
  else:
    reference_input = img
  reference = processor(images=reference_input, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = image_lib.preprocess(img, size=32, mean=processor.image_mean, std=processor.image_std, mode=mode)
  np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_resize_mode_ignores_the_aspect_ratio():
  img = Image.new("RGB", (40, 20), RED)
  img.paste(BLUE, (20, 0, 40, 20))
  out = image_lib.preprocess(img, size=16, mean=(0, 0, 0), std=(1, 1, 1), mode="resize")
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out[:, 0], [[1, 0, 0]] * 16, atol=1e-6)  # no padding rows
  np.testing.assert_allclose(out[:, -1], [[0, 0, 1]] * 16, atol=1e-6)


def test_unusable_files_name_the_file_and_the_reason(tmp_path):
  good = tmp_path / "good.png"
  Image.new("RGB", (64, 64), RED).save(good)
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
  (tmp_path / "text.png").write_text("this is not an image\n")
  cases = {"missing.png": "missing_image", "empty.png": "empty_image",
           "truncated.png": "corrupt_image", "text.png": "not_an_image"}
  for name, reason in cases.items():
    with pytest.raises(BadRecordError) as info:
      image_lib.load_pixels(str(tmp_path / name), size=8, mean=CLIP_MEAN, std=CLIP_STD)
    assert info.value.reason == reason and name in str(info.value)
  assert image_lib.load_pixels(str(good), size=8, mean=CLIP_MEAN, std=CLIP_STD).shape == (8, 8, 3)


def test_a_thin_image_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
  """A 20000 x 1 PNG of ~100 bytes passes Pillow's pixel-count guard, but padding it to a square
  would take 20000^2 * 3 = 1.2 GB: refused from the header, before any decode or pad, for a
  file and for bytes alike; a wide image within the bounds is shrunk before it is padded."""
  thin = tmp_path / "thin.png"
  Image.new("RGB", (20000, 1), (255, 255, 255)).save(thin, optimize=True)
  assert os.path.getsize(thin) < 200

  def never(*args, **kwargs):
    raise AssertionError("decoded or padded")

  monkeypatch.setattr(Image.Image, "load", never)
  monkeypatch.setattr(image_lib, "expand_to_square", never)
  for load in (lambda: image_lib.load_pixels(str(thin), size=8, mean=CLIP_MEAN, std=CLIP_STD),
               lambda: image_lib.load_pixels_from_bytes(thin.read_bytes(), "thin", size=8, mean=CLIP_MEAN,
                                                        std=CLIP_STD)):
    with pytest.raises(BadRecordError, match=r"image is 20000 x 1 pixels, beyond the bounds") as info:
      load()
    assert info.value.reason == "image_too_large"
  monkeypatch.undo()
  wide = tmp_path / "wide.png"  # aspect 10 and side 10000: allowed; padded at full size it would be 300 MB
  Image.new("RGB", (10000, 1000), RED).save(wide)
  canvases = []
  real_new = Image.new
  monkeypatch.setattr(Image, "new", lambda mode, size, *a: canvases.append(size) or real_new(mode, size, *a))
  out = image_lib.load_pixels(str(wide), size=8, mean=CLIP_MEAN, std=CLIP_STD)
  assert out.shape == (8, 8, 3)
  assert canvases and max(max(s) for s in canvases) <= image_lib.PAD_MAX_SIDE
