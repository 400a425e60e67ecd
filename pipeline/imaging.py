"""Decoding, resizing and encoding of one image, shared by every dataset the builder knows."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    # What the original MAML resize script effectively did on Omniglot: Pillow resizes 1-bit
    # images with NEAREST whatever filter is asked for.
    "nearest": Image.Resampling.NEAREST,
}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  size: int  # output is size x size
  channels: int  # 1 (grayscale) or 3 (RGB)
  invert: bool = False  # Omniglot: strokes become 255 so ink is high, as the MAML code feeds it
  resample: str = "lanczos"

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"image size must be positive, got {self.size}")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels}")
    if self.resample not in RESAMPLE:
      raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")


@dataclasses.dataclass(frozen=True)
class Prepared:
  pixels: np.ndarray  # uint8 [size, size, channels]
  original_jpeg: bytes | None  # the source bytes, when they can be stored unchanged


def prepare(raw: bytes, spec: ImageSpec) -> Prepared:
  """Decodes ``raw`` fully (so corrupt files fail here) and brings it to ``spec``.

  Raises ``ValueError`` or ``OSError`` with Pillow's reason when the bytes are not an image.
  """
  with Image.open(io.BytesIO(raw)) as img:
    img.load()
    mode = "L" if spec.channels == 1 else "RGB"
    keep = (img.format == "JPEG" and img.mode == mode and img.size == (spec.size, spec.size)
            and not spec.invert)
    converted = img.convert(mode)
  if converted.size != (spec.size, spec.size):
    converted = converted.resize((spec.size, spec.size), RESAMPLE[spec.resample])
  pixels = np.asarray(converted, dtype=np.uint8)
  if spec.invert:
    pixels = 255 - pixels
  if pixels.ndim == 2:
    pixels = pixels[:, :, None]
  return Prepared(pixels, raw if keep else None)


def encode_png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
  return buf.getvalue()


def encode_for_class(prepared: Prepared, quarter_turns: int) -> bytes:
  """The stored bytes for one output class: the kept JPEG, or a PNG of the rotated pixels."""
  if quarter_turns == 0 and prepared.original_jpeg is not None:
    return prepared.original_jpeg
  return encode_png(np.ascontiguousarray(np.rot90(prepared.pixels, k=quarter_turns)))
