"""Calibration data for pruning vision-language models.

This module provides everything needed to feed (image, caption) pairs to a
BLIP-style model without any network access:

* :func:`preprocess_image` -- the built-in BLIP/CLIP image preprocessing
  (RGB, bicubic resize, scale to ``[0, 1]``, normalise with
  :data:`CLIP_MEAN` / :data:`CLIP_STD`).
* :class:`SimpleTokenizer` -- a deterministic, offline word-level tokenizer
  for the built-in tiny models.
* :func:`procedural_sample` / :class:`BuiltinCalibrationSet` -- procedurally
  drawn images of simple coloured shapes with matching captions, generated
  deterministically at run time.
* :class:`ImageCaptionDataset` -- the original MULTIFLOW/BLIP JSON format
  (a list of ``{"image": ..., "caption": ...}`` entries).
* :func:`calibration_batches` -- turns a dataset into a list of batches with
  the keys a BLIP processor returns (``pixel_values``, ``input_ids``,
  ``attention_mask``).
* :func:`load_data` -- builds a dataset from a short string spec.

``transformers`` is never imported here; a processor object is only called if
one is passed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import random
import re
import zlib
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "preprocess_image",
    "SimpleTokenizer",
    "procedural_sample",
    "BuiltinCalibrationSet",
    "ImageCaptionDataset",
    "calibration_batches",
    "CalibrationBatches",
    "UnreadableImageError",
    "load_data",
]

# ---------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------

#: Per-channel RGB mean used by BLIP/CLIP image preprocessing.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
#: Per-channel RGB standard deviation used by BLIP/CLIP image preprocessing.
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """Built-in BLIP-style preprocessing of one image.

    Converts ``img`` to RGB, resizes it to ``image_size x image_size`` with
    bicubic interpolation, scales pixel values to ``[0, 1]`` and normalises
    each channel with :data:`CLIP_MEAN` and :data:`CLIP_STD`.

    Args:
        img: a PIL image (any mode).
        image_size: side length of the square output, in pixels (>= 1).

    Returns:
        A ``torch.float32`` tensor of shape ``(3, image_size, image_size)``.

    Raises:
        TypeError: if ``img`` is not a PIL image.
        ValueError: if ``image_size`` is not a positive integer.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(img).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), resample=_BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


# ---------------------------------------------------------------------------
# Procedural scene vocabulary (shared by the sampler and the tokenizer)
# ---------------------------------------------------------------------------

# name -> RGB. Order matters (it is part of the deterministic sampling).
_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "pink": (245, 130, 190),
    "brown": (130, 80, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (30, 200, 210),
}

# shape kind -> noun phrase used in captions.
_SHAPES: dict[str, str] = {
    "circle": "circle",
    "square": "square",
    "triangle": "triangle",
    "diamond": "diamond",
    "star": "star",
    "cross": "cross",
    "hstripes": "square with horizontal stripes",
    "vstripes": "square with vertical stripes",
}

# size word -> fraction of a grid cell covered by the shape's bounding box.
_SIZES: dict[str, float] = {"small": 0.45, "medium": 0.7, "large": 0.95}

# 3x3 grid cell (row-major) -> position phrase.
_POSITIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)

_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a picture of {}",
    "an image showing {}",
    "a drawing of {}",
    "a simple illustration of {}",
    "there is {}",
    "a synthetic image with {}",
    "a photo of {}",
)

_BACKGROUND_PHRASES: tuple[str, ...] = (
    "on a {} background",
    "against a {} background",
)

_MIN_PROCEDURAL_SIZE = 16

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_COMMON_WORDS = """
the be to of and a an in that have i it for not on with he as you do at this
but his by from they we say her she or will my one all would there their what
so up out if about who get which go me when make can like time no just him
know take people into year your good some could them see other than then now
look only come its over think also back after use two how our work first well
way even new want because any these give day most us is are was were been has
had did does am being man woman men women person boy girl child children baby
dog cat horse bird cow sheep elephant bear zebra giraffe animal animals car bus
truck train bike bicycle motorcycle airplane plane boat street road sign city
building house room kitchen table chair bed couch sofa window door wall floor
food pizza sandwich cake plate bowl cup water sky tree trees grass field beach
ocean sea snow mountain park player ball game tennis baseball frisbee skateboard
surfboard kite umbrella phone computer laptop book clock picture photo image
shows showing standing sitting walking riding holding playing looking eating
lying near next front behind top side down open two three several many group
some small large big little old young tall long short white black red blue green
yellow brown gray grey orange pink purple colorful color colored dark light bright
here very this that these those while under between around inside outside across
""".split()


def _build_word_list() -> tuple[str, ...]:
    words: list[str] = []

    def add_text(text: str) -> None:
        words.extend(_split_words(text))

    for tmpl in _TEMPLATES:
        add_text(tmpl.format(""))
    for phrase in _BACKGROUND_PHRASES:
        add_text(phrase.format(""))
    add_text("and")
    for name in _COLORS:
        add_text(name)
    for noun in _SHAPES.values():
        add_text(noun)
    for size in _SIZES:
        add_text(size)
    for pos in _POSITIONS:
        add_text(pos)
    add_text("a an")
    words.extend(_COMMON_WORDS)
    seen: set[str] = set()
    ordered: list[str] = []
    for w in words:
        if w not in seen:
            seen.add(w)
            ordered.append(w)
    return tuple(ordered)


_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)


def _split_words(text: str) -> list[str]:
    """Lowercase ``text`` and split it on non-alphanumeric characters."""
    return _WORD_RE.findall(text.lower())


_WORD_LIST: tuple[str, ...] = _build_word_list()
_FIRST_WORD_ID = 4


class SimpleTokenizer:
    """Deterministic offline word-level tokenizer for the built-in tiny models.

    Text is lowercased and split on non-alphanumeric characters. Words of a
    fixed built-in word list (every word the procedural captions can produce
    plus common English words, in a fixed order) map to ids starting at 4;
    any other word is hashed with ``zlib.crc32`` (stable across processes and
    Python versions) into the remaining ids ``[4 + len(word_list), vocab_size)``.

    A sequence is ``[bos] + word ids + [sep]``; if it is longer than
    ``max_length`` it is truncated, keeping ``sep`` as the last token.

    Args:
        vocab_size: total number of ids. Must leave at least one id for
            hashed words, i.e. ``vocab_size > 4 + len(SimpleTokenizer.word_list)``.
        max_length: default maximum sequence length (>= 2, counts bos and sep).
        pad_token_id, bos_token_id, sep_token_id, unk_token_id: special ids;
            they must be distinct and in ``[0, 4)``. ``unk_token_id`` is
            reserved for compatibility (hashing means no word is unknown).

    Raises:
        ValueError: if ``vocab_size`` is too small for the word list, if
            ``max_length < 2`` or the special ids are invalid.
    """

    #: The fixed built-in word list, in id order (ids start at 4).
    word_list: tuple[str, ...] = _WORD_LIST

    def __init__(
        self,
        vocab_size: int = 1024,
        max_length: int = 32,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        sep_token_id: int = 2,
        unk_token_id: int = 3,
    ) -> None:
        min_vocab = _FIRST_WORD_ID + len(self.word_list) + 1
        if not isinstance(vocab_size, int) or vocab_size < min_vocab:
            raise ValueError(
                f"SimpleTokenizer: vocab_size={vocab_size!r} is too small for the built-in "
                f"word list ({len(self.word_list)} words + 4 special ids + at least 1 hash "
                f"bucket); use vocab_size >= {min_vocab}"
            )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"SimpleTokenizer: max_length must be an integer >= 2 (room for bos and sep), "
                f"got {max_length!r}"
            )
        specials = {
            "pad_token_id": pad_token_id,
            "bos_token_id": bos_token_id,
            "sep_token_id": sep_token_id,
            "unk_token_id": unk_token_id,
        }
        for name, value in specials.items():
            if not isinstance(value, int) or not 0 <= value < _FIRST_WORD_ID:
                raise ValueError(
                    f"SimpleTokenizer: {name} must be an integer in [0, {_FIRST_WORD_ID}), "
                    f"got {value!r}"
                )
        if len(set(specials.values())) != len(specials):
            raise ValueError(f"SimpleTokenizer: special token ids must be distinct, got {specials}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.sep_token_id = sep_token_id
        self.unk_token_id = unk_token_id
        self.vocab: dict[str, int] = {w: _FIRST_WORD_ID + i for i, w in enumerate(self.word_list)}
        self._hash_start = _FIRST_WORD_ID + len(self.word_list)
        self._num_hash = vocab_size - self._hash_start

    def __len__(self) -> int:
        """Return ``vocab_size``."""
        return self.vocab_size

    def __repr__(self) -> str:
        return f"SimpleTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"

    def token_id(self, word: str) -> int:
        """Return the id of one (already lowercased, alphanumeric) ``word``."""
        idx = self.vocab.get(word)
        if idx is not None:
            return idx
        return self._hash_start + zlib.crc32(word.encode("utf-8")) % self._num_hash

    def encode(self, text: str, max_length: int | None = None, truncation: bool = True) -> list[int]:
        """Encode one text to ``[bos] + word ids + [sep]`` (a list of ints).

        Args:
            text: the text to encode.
            max_length: truncation length (defaults to ``self.max_length``).
            truncation: if False, never truncate.

        Raises:
            TypeError: if ``text`` is not a string.
            ValueError: if ``max_length < 2``.
        """
        if not isinstance(text, str):
            raise TypeError(f"SimpleTokenizer.encode expects a str, got {type(text).__name__}: {text!r}")
        max_length = self.max_length if max_length is None else max_length
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"SimpleTokenizer: max_length must be an integer >= 2, got {max_length!r}")
        ids = [self.bos_token_id] + [self.token_id(w) for w in _split_words(text)] + [self.sep_token_id]
        if truncation and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_token_id]
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        truncation: bool = True,
    ) -> dict[str, Any]:
        """Tokenize one text or a batch of texts.

        Args:
            texts: a string or a list of strings.
            padding: ``True`` / ``"longest"`` pads (right, with ``pad_token_id``)
                to the longest sequence of the batch; ``"max_length"`` pads to
                ``max_length``; ``False`` / ``"do_not_pad"`` does not pad (with
                ``return_tensors="pt"`` all sequences must then have equal length).
            max_length: truncation / padding length (defaults to ``self.max_length``).
            return_tensors: ``"pt"`` for ``torch.long`` tensors of shape
                ``(B, L)``, ``None`` for lists of lists.
            truncation: if False, sequences are never truncated.

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``; the mask is 1 for
            real tokens (including bos/sep) and 0 for padding.

        Raises:
            TypeError / ValueError: on invalid inputs or arguments.
        """
        if isinstance(texts, str):
            batch = [texts]
        elif isinstance(texts, Sequence) and not isinstance(texts, (bytes, bytearray)):
            batch = list(texts)
        else:
            raise TypeError(f"SimpleTokenizer expects a str or a list of str, got {type(texts).__name__}")
        for i, t in enumerate(batch):
            if not isinstance(t, str):
                raise TypeError(f"SimpleTokenizer: text at index {i} is {type(t).__name__}, expected str")
        max_length = self.max_length if max_length is None else max_length
        seqs = [self.encode(t, max_length=max_length, truncation=truncation) for t in batch]

        if padding is True or padding == "longest":
            target = max((len(s) for s in seqs), default=0)
        elif padding == "max_length":
            target = max([max_length] + [len(s) for s in seqs])
        elif padding is False or padding == "do_not_pad":
            target = None
        else:
            raise ValueError(
                f"SimpleTokenizer: padding must be True, False, 'longest', 'max_length' or "
                f"'do_not_pad', got {padding!r}"
            )

        if target is None:
            input_ids = [list(s) for s in seqs]
            attention_mask = [[1] * len(s) for s in seqs]
        else:
            input_ids = [s + [self.pad_token_id] * (target - len(s)) for s in seqs]
            attention_mask = [[1] * len(s) + [0] * (target - len(s)) for s in seqs]

        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors != "pt":
            raise ValueError(f"SimpleTokenizer: return_tensors must be 'pt' or None, got {return_tensors!r}")
        if len({len(s) for s in input_ids}) > 1:
            raise ValueError(
                "SimpleTokenizer: sequences have different lengths; use padding=True to "
                "return tensors"
            )
        if not input_ids:
            return {
                "input_ids": torch.zeros((0, 0), dtype=torch.long),
                "attention_mask": torch.zeros((0, 0), dtype=torch.long),
            }
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }


# ---------------------------------------------------------------------------
# Procedural calibration data
# ---------------------------------------------------------------------------


def _stable_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"multiflow-procedural:{seed}:{index}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big")


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def _sample_layout(index: int, image_size: int, seed: int) -> dict[str, Any]:
    """Draw the random scene description for ``(index, seed)``.

    Returns a dict with ``background`` (colour name), ``template`` and
    ``background_phrase`` (format strings) and ``shapes``: a list of dicts with
    ``kind``, ``color``, ``size``, ``cell`` (0..8), ``center`` ``(x, y)`` and
    ``radius`` (half the bounding-box side) in pixels.
    """
    rng = random.Random(_stable_seed(seed, index))
    color_names = list(_COLORS)
    background = rng.choice(color_names)
    n_shapes = rng.randint(1, 3)
    cells = rng.sample(range(9), n_shapes)
    cell_size = image_size / 3.0
    shapes = []
    for cell in cells:
        kind = rng.choice(list(_SHAPES))
        color = rng.choice([c for c in color_names if c != background])
        size = rng.choice(list(_SIZES))
        radius = _SIZES[size] * cell_size / 2.0
        slack = max(0.0, cell_size / 2.0 - radius)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * cell_size + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell_size + rng.uniform(-slack, slack)
        shapes.append(
            {"kind": kind, "color": color, "size": size, "cell": cell, "center": (cx, cy), "radius": radius}
        )
    return {
        "background": background,
        "template": rng.choice(_TEMPLATES),
        "background_phrase": rng.choice(_BACKGROUND_PHRASES),
        "shapes": shapes,
    }


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Mapping[str, Any]) -> None:
    cx, cy = shape["center"]
    r = shape["radius"]
    fill = _COLORS[shape["color"]]
    kind = shape["kind"]
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    elif kind == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif kind in ("hstripes", "vstripes"):
        # 5 bands, the 1st, 3rd and 5th coloured (so the centre is coloured).
        band = 2 * r / 5.0
        for k in (0, 2, 4):
            lo, hi = -r + k * band, -r + (k + 1) * band
            if kind == "hstripes":
                draw.rectangle([cx - r, cy + lo, cx + r, cy + hi], fill=fill)
            else:
                draw.rectangle([cx + lo, cy - r, cx + hi, cy + r], fill=fill)
    else:  # pragma: no cover - guarded by _SHAPES
        raise ValueError(f"unknown shape kind {kind!r}")


def _caption(layout: Mapping[str, Any]) -> str:
    parts = []
    for shape in layout["shapes"]:
        phrase = f"{shape['size']} {shape['color']} {_SHAPES[shape['kind']]}"
        parts.append(f"{_article(phrase)} {phrase} {_POSITIONS[shape['cell']]}")
    if len(parts) == 1:
        objects = parts[0]
    else:
        objects = ", ".join(parts[:-1]) + " and " + parts[-1]
    background = layout["background_phrase"].format(layout["background"])
    return layout["template"].format(f"{objects} {background}")


def procedural_sample(index: int, image_size: int = 64, seed: int = 0) -> tuple[Image.Image, str]:
    """Generate one deterministic synthetic (image, caption) pair.

    The image is an ``image_size x image_size`` RGB picture with a coloured
    background and 1 to 3 shapes (circle, square, triangle, diamond, star,
    cross, square with horizontal/vertical stripes) of varied colours, sizes
    (small/medium/large) and positions (cells of a 3x3 grid such as
    "at the top left" or "in the center"). The caption describes the scene,
    e.g. ``"a picture of a large red circle at the top left and a small blue
    square in the center on a yellow background"``.

    Everything is driven by ``random.Random`` seeded with a SHA-256 hash of
    ``(seed, index)``, so the same ``(index, image_size, seed)`` always gives
    identical pixels and caption, across runs and processes.

    Args:
        index: sample index (any integer >= 0).
        image_size: side length in pixels (>= 16).
        seed: dataset seed.

    Raises:
        ValueError: if ``index`` is negative or ``image_size`` is too small.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"procedural_sample: index must be a non-negative integer, got {index!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _MIN_PROCEDURAL_SIZE:
        raise ValueError(
            f"procedural_sample: image_size must be an integer >= {_MIN_PROCEDURAL_SIZE}, got {image_size!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"procedural_sample: seed must be an integer, got {seed!r}")
    layout = _sample_layout(index, image_size, seed)
    img = Image.new("RGB", (image_size, image_size), _COLORS[layout["background"]])
    draw = ImageDraw.Draw(img)
    for shape in layout["shapes"]:
        _draw_shape(draw, shape)
    return img, _caption(layout)


class BuiltinCalibrationSet(Dataset):
    """Procedurally generated calibration set (no download needed).

    Item ``i`` is ``{"image": PIL.Image, "caption": str}`` as produced by
    :func:`procedural_sample` ``(i, image_size, seed)``; items are generated
    on access and are fully deterministic.

    Args:
        num_samples: number of samples (>= 1).
        image_size: side length of the generated images (>= 16).
        seed: dataset seed; different seeds give different samples.

    Raises:
        ValueError: on invalid arguments.
    """

    def __init__(self, num_samples: int = 256, image_size: int = 64, seed: int = 0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"BuiltinCalibrationSet: num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _MIN_PROCEDURAL_SIZE:
            raise ValueError(
                f"BuiltinCalibrationSet: image_size must be an integer >= {_MIN_PROCEDURAL_SIZE}, "
                f"got {image_size!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"BuiltinCalibrationSet: seed must be an integer, got {seed!r}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, self.num_samples, type(self).__name__)
        img, caption = procedural_sample(index, self.image_size, self.seed)
        return {"image": img, "caption": caption}

    def __repr__(self) -> str:
        return (
            f"BuiltinCalibrationSet(num_samples={self.num_samples}, image_size={self.image_size}, "
            f"seed={self.seed})"
        )


def _check_index(index: Any, length: int, owner: str) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{owner} indices must be integers, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"{owner} index {index} out of range for {length} samples")
    return index


# ---------------------------------------------------------------------------
# JSON image-caption dataset
# ---------------------------------------------------------------------------


class UnreadableImageError(ValueError):
    """An image of the data set is missing or cannot be decoded (a ValueError)."""


class CalibrationBatches(SequenceABC):
    """The batches :func:`calibration_batches` returns: a sequence (``len``, indexing,
    iteration, as often as wanted) that builds each batch when it is asked for, so that
    calibrating holds one batch at a time, not the whole calibration set. ``skipped`` lists
    ``(index, reason)`` for every sample left out because its image could not be read."""

    skipped: list

    def __init__(self, build, count: int, skipped=()):
        self._build = build  # batch number -> batch dict
        self._count = count
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self._build(i) for i in range(*j.indices(self._count))]
        j = operator.index(j)
        if j < 0:
            j += self._count
        if not 0 <= j < self._count:
            raise IndexError(f"batch {j} of {self._count}")
        return self._build(j)

    def __iter__(self):
        return (self._build(j) for j in range(self._count))


class ImageCaptionDataset(Dataset):
    """Image-caption pairs in the original MULTIFLOW/BLIP JSON format.

    The JSON file holds a list of ``{"image": path, "caption": text}``
    entries; ``path`` is relative to ``image_root`` (absolute paths are used
    as they are) and ``caption`` may also be a non-empty list of strings, in
    which case the first one is used. Extra keys are ignored.

    The JSON is read and validated in the constructor; images are loaded
    lazily in ``__getitem__`` and returned as RGB PIL images. Items are
    ``{"image": PIL.Image, "caption": str}``.

    Args:
        json_path: path to the JSON annotation file.
        image_root: folder the image paths are relative to.
        max_samples: if given, keep only the first ``max_samples`` entries.

    Raises:
        FileNotFoundError: if the JSON file or the image root does not exist.
        ValueError: if the JSON cannot be parsed, is not a list of dicts with
            ``image`` and ``caption`` keys (the message names the file and the
            first bad entry index), or has no samples.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path, max_samples: int | None = None) -> None:
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"ImageCaptionDataset: annotation file not found: {str(self.json_path)!r}")
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"ImageCaptionDataset: image root folder not found: {str(self.image_root)!r}")
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ValueError(f"ImageCaptionDataset: max_samples must be None or a positive integer, got {max_samples!r}")
        try:
            with open(self.json_path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ImageCaptionDataset: {str(self.json_path)!r} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(
                f"ImageCaptionDataset: {str(self.json_path)!r} must contain a JSON list of "
                f'{{"image": ..., "caption": ...}} entries, got {type(data).__name__}'
            )
        if not data:
            raise ValueError(f"ImageCaptionDataset: {str(self.json_path)!r} contains no samples")
        entries: list[tuple[str, str]] = []
        for i, entry in enumerate(data):
            problem = None
            caption = None
            if not isinstance(entry, dict):
                problem = f"expected a dict, got {type(entry).__name__}"
            elif "image" not in entry or "caption" not in entry:
                missing = [k for k in ("image", "caption") if k not in entry]
                problem = f"missing key(s) {missing}"
            elif not isinstance(entry["image"], str) or not entry["image"]:
                problem = f"'image' must be a non-empty string, got {entry['image']!r}"
            else:
                caption = entry["caption"]
                if isinstance(caption, list):
                    caption = caption[0] if caption else None
                if not isinstance(caption, str):
                    problem = f"'caption' must be a string or a non-empty list of strings, got {entry['caption']!r}"
            if problem is not None:
                raise ValueError(f"ImageCaptionDataset: {str(self.json_path)!r}: bad entry at index {i}: {problem}")
            entries.append((entry["image"], caption))
            if max_samples is not None and len(entries) >= max_samples:
                break
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def image_path(self, index: int) -> Path:
        """Return the full path of the image of entry ``index``."""
        index = _check_index(index, len(self._entries), type(self).__name__)
        return self.image_root / self._entries[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self._entries), type(self).__name__)
        rel, caption = self._entries[index]
        path = self.image_root / rel
        if not path.is_file():
            raise UnreadableImageError(f"ImageCaptionDataset: image not found: {str(path)!r} (entry {index} of {str(self.json_path)!r})")
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UnreadableImageError(
                f"ImageCaptionDataset: could not decode image {str(path)!r} "
                f"(entry {index} of {str(self.json_path)!r}): {e}"
            ) from e
        return {"image": img, "caption": caption}

    def __repr__(self) -> str:
        return (
            f"ImageCaptionDataset(json_path={str(self.json_path)!r}, image_root={str(self.image_root)!r}, "
            f"num_samples={len(self)})"
        )


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

_BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask")


def _unpack_item(item: Any, index: int) -> tuple[Image.Image, str]:
    if isinstance(item, Mapping):
        if "image" not in item or "caption" not in item:
            raise ValueError(
                f"calibration_batches: dataset item {index} must have 'image' and 'caption' keys, "
                f"got keys {sorted(item)}"
            )
        image, caption = item["image"], item["caption"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, caption = item
    else:
        raise ValueError(
            f"calibration_batches: dataset item {index} must be a dict with 'image' and 'caption' "
            f"(or an (image, caption) pair), got {type(item).__name__}"
        )
    if not isinstance(image, Image.Image):
        raise ValueError(f"calibration_batches: dataset item {index}: 'image' is {type(image).__name__}, expected PIL.Image")
    if not isinstance(caption, str):
        raise ValueError(f"calibration_batches: dataset item {index}: 'caption' is {type(caption).__name__}, expected str")
    return image, caption


def calibration_batches(
    dataset: Any,
    *,
    batch_size: int = 8,
    num_batches: int | None = None,
    image_size: int | None = None,
    tokenizer: Any = None,
    processor: Any = None,
    max_length: int = 32,
    max_bad_fraction: float = 0.1,
) -> "CalibrationBatches":
    """Build calibration batches from an image-caption dataset.

    Items are taken deterministically in dataset order, ``batch_size`` at a
    time; the last partial batch is kept. Each batch is a dict with the keys a
    BLIP processor returns: ``pixel_values`` (``float32``, ``(B, 3, S, S)``),
    ``input_ids`` and ``attention_mask`` (``long``, ``(B, L)``).

    Two preprocessing modes:

    * ``processor`` given (e.g. a ``transformers.BlipProcessor``): it is
      called as ``processor(images=[...], text=[...], return_tensors="pt",
      padding=True, truncation=True, max_length=max_length)`` and the three
      keys above are kept. If ``image_size`` is also given, the processor's
      output resolution must match it.
    * otherwise the built-in preprocessing: :func:`preprocess_image` with
      ``image_size`` (required) and ``tokenizer`` (default
      ``SimpleTokenizer(max_length=max_length)``), called as
      ``tokenizer(captions, padding=True, truncation=True,
      max_length=max_length, return_tensors="pt")``.

    Every sample is read once up front (the unreadable ones are skipped then, and
    errors are raised then); the batches themselves are built when asked for (the
    result is a :class:`CalibrationBatches` sequence: ``len()``, indexing, repeated
    iteration), reading their samples again, so calibration holds one batch at a time
    whatever the number of batches.

    Args:
        dataset: a map-style dataset (``len`` + integer indexing) whose items
            are ``{"image": PIL.Image, "caption": str}`` dicts (or
            ``(image, caption)`` pairs).
        batch_size: samples per batch (>= 1).
        num_batches: maximum number of batches (>= 1); ``None`` = all.
        image_size: output resolution for the built-in preprocessing.
        tokenizer: tokenizer for the built-in preprocessing.
        processor: a BLIP-style processor (replaces image_size/tokenizer).
        max_length: maximum text length in tokens.
        max_bad_fraction: samples whose image is missing or cannot be decoded are
            skipped and listed in the result's ``skipped`` (later samples take their
            places); if more than this fraction of the samples read are unreadable,
            ValueError (raised as soon as that is certain, whatever the rest holds).

    Raises:
        ValueError: if the dataset is empty, ``batch_size < 1``,
            ``num_batches < 1``, ``image_size`` is missing for built-in
            preprocessing, both ``processor`` and ``tokenizer`` are given,
            an item is malformed, or the processor/tokenizer output lacks a key.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibration_batches: batch_size must be a positive integer, got {batch_size!r}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"calibration_batches: num_batches must be None or a positive integer, got {num_batches!r}")
    try:
        n = len(dataset)
    except TypeError as e:
        raise ValueError(f"calibration_batches: dataset {type(dataset).__name__} has no len()") from e
    if n == 0:
        raise ValueError(f"calibration_batches: dataset {type(dataset).__name__} is empty (no samples)")
    if processor is not None and tokenizer is not None:
        raise ValueError("calibration_batches: pass either processor or tokenizer, not both")
    if processor is None:
        if image_size is None:
            raise ValueError(
                "calibration_batches: image_size is required when no processor is given "
                "(built-in preprocessing)"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"calibration_batches: image_size must be a positive integer, got {image_size!r}")
        if tokenizer is None:
            tokenizer = SimpleTokenizer(max_length=max_length)

    wanted = n if num_batches is None else min(n, num_batches * batch_size)
    # Samples whose image cannot be read are skipped (and counted); later samples take
    # their place, so batches stay full. More than max_bad_fraction of the samples read
    # unreadable is an error, raised as soon as no later sample can bring it back under.
    readable: list[int] = []
    skipped: list[tuple[int, str]] = []

    def too_many(at_most_readable: int) -> bool:
        return len(skipped) > max_bad_fraction * (at_most_readable + len(skipped))

    for i in range(n):
        if len(readable) == wanted:
            break
        try:
            _unpack_item(dataset[i], i)  # read and checked now; the batch reads it again
        except UnreadableImageError as e:
            skipped.append((i, str(e)))
            if too_many(wanted):
                break
            continue
        readable.append(i)
    if too_many(len(readable)):
        raise ValueError(
            f"calibration_batches: {len(skipped)} of the {len(readable) + len(skipped)} samples read have "
            f"unreadable images: more than max_bad_fraction={max_bad_fraction} of the samples, even if every "
            f"other one of the {wanted} wanted could be read; first: {skipped[0][1]}")
    if not readable:
        raise ValueError(f"calibration_batches: no readable sample ({len(skipped)} skipped; first: "
                         f"{skipped[0][1] if skipped else '-'})")

    def build(j: int) -> dict:
        chunk = readable[j * batch_size:(j + 1) * batch_size]
        items = [_unpack_item(dataset[i], i) for i in chunk]
        images = [im for im, _ in items]
        captions = [c for _, c in items]
        if processor is not None:
            out = processor(
                images=images,
                text=captions,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            source = f"processor {type(processor).__name__}"
            pixel_values = _get_key(out, "pixel_values", source)
            if image_size is not None and tuple(pixel_values.shape[-2:]) != (image_size, image_size):
                raise ValueError(
                    f"calibration_batches: {source} produced images of size "
                    f"{tuple(pixel_values.shape[-2:])}, but image_size={image_size} was requested"
                )
        else:
            out = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            source = f"tokenizer {type(tokenizer).__name__}"
            pixel_values = torch.stack([preprocess_image(img, image_size) for img in images])
        return {
            "pixel_values": torch.as_tensor(pixel_values).to(torch.float32),
            "input_ids": torch.as_tensor(_get_key(out, "input_ids", source)).to(torch.long),
            "attention_mask": torch.as_tensor(_get_key(out, "attention_mask", source)).to(torch.long),
        }

    batches = CalibrationBatches(build, math.ceil(len(readable) / batch_size), skipped)
    build(0)  # the first batch now: a processor / tokenizer that does not fit fails here, not mid-calibration
    return batches


def _get_key(out: Any, key: str, source: str) -> Any:
    try:
        return out[key]
    except (KeyError, TypeError) as e:
        raise ValueError(f"calibration_batches: {source} output has no {key!r}") from e


# ---------------------------------------------------------------------------
# Spec parsing
# ---------------------------------------------------------------------------


def load_data(
    spec: str | None,
    *,
    num_samples: int | None = 256,
    image_size: int = 64,
    seed: int = 0,
) -> Dataset:
    """Build a calibration dataset from a string spec.

    Specs:

    * ``None`` or ``"builtin"``: :class:`BuiltinCalibrationSet` with
      ``num_samples`` (``None`` = 256), ``image_size`` and ``seed``.
    * ``"path/to/file.json"``: :class:`ImageCaptionDataset` with the JSON's
      folder as image root.
    * ``"path/to/file.json:IMAGE_ROOT"``: :class:`ImageCaptionDataset` with
      ``IMAGE_ROOT`` as image root.

    For JSON datasets, ``num_samples`` caps the number of entries used (the
    first ones; ``None`` = all) and ``image_size`` / ``seed`` are unused
    (resizing happens in :func:`calibration_batches`).

    Raises:
        ValueError: if the spec is not recognised.
        FileNotFoundError / ValueError: from :class:`ImageCaptionDataset`.
    """
    if spec is None or spec.strip() == "builtin":
        return BuiltinCalibrationSet(
            num_samples=256 if num_samples is None else num_samples, image_size=image_size, seed=seed
        )
    if not isinstance(spec, str):
        raise ValueError(f"load_data: spec must be None, 'builtin' or a JSON path, got {spec!r}")
    if spec.lower().endswith(".json") or (Path(spec).is_file() and ".json:" not in spec.lower()):
        json_path = Path(spec)
        image_root = json_path.parent
    else:
        pos = spec.lower().find(".json:")
        if pos < 0:
            raise ValueError(
                f"load_data: unrecognised data spec {spec!r}; expected 'builtin', "
                f"'path/to/file.json' or 'path/to/file.json:IMAGE_ROOT'"
            )
        json_path = Path(spec[: pos + len(".json")])
        root = spec[pos + len(".json:") :]
        if not root:
            raise ValueError(f"load_data: empty IMAGE_ROOT in data spec {spec!r}")
        image_root = Path(root)
    return ImageCaptionDataset(json_path, image_root, max_samples=num_samples)
