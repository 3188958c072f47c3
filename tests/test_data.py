"""Tests for multiflow.data (calibration data, tokenizer, preprocessing)."""

from __future__ import annotations

import collections.abc
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiflow import data as D
from multiflow.data import (
    CLIP_MEAN,
    CLIP_STD,
    BuiltinCalibrationSet,
    ImageCaptionDataset,
    SimpleTokenizer,
    calibration_batches,
    load_data,
    preprocess_image,
    procedural_sample,
)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_preprocess_mean_colour_is_zero():
    mean_rgb = tuple(round(m * 255) for m in CLIP_MEAN)
    img = Image.new("RGB", (37, 21), mean_rgb)
    x = preprocess_image(img, 24)
    assert x.shape == (3, 24, 24)
    assert x.dtype == torch.float32
    # rounding to 8 bits costs at most 0.5/255/std ~ 0.008
    assert x.abs().max().item() < 0.01


def test_preprocess_values_and_mode_conversion():
    white = preprocess_image(Image.new("L", (8, 8), 255), 8)
    black = preprocess_image(Image.new("RGBA", (8, 8), (0, 0, 0, 255)), 8)
    for c in range(3):
        assert torch.allclose(white[c], torch.full((8, 8), (1 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-5)
        assert torch.allclose(black[c], torch.full((8, 8), -CLIP_MEAN[c] / CLIP_STD[c]), atol=1e-5)


def test_preprocess_errors():
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((4, 4, 3)), 4)
    with pytest.raises(ValueError, match="image_size"):
        preprocess_image(Image.new("RGB", (4, 4)), 0)


# ---------------------------------------------------------------------------
# procedural data
# ---------------------------------------------------------------------------


def test_procedural_determinism():
    a_img, a_cap = procedural_sample(5, image_size=64, seed=3)
    b_img, b_cap = procedural_sample(5, image_size=64, seed=3)
    assert a_img.size == (64, 64) and a_img.mode == "RGB"
    assert a_cap == b_cap
    assert a_img.tobytes() == b_img.tobytes()


def test_procedural_indices_and_seeds_differ():
    samples = [procedural_sample(i) for i in range(20)]
    captions = {c for _, c in samples}
    images = {img.tobytes() for img, _ in samples}
    assert len(captions) >= 18
    assert len(images) >= 18
    seed0 = [procedural_sample(i, seed=0)[1] for i in range(5)]
    seed1 = [procedural_sample(i, seed=1)[1] for i in range(5)]
    assert seed0 != seed1
    # image size does not change the scene description
    assert procedural_sample(4, image_size=32)[1] == procedural_sample(4, image_size=96)[1]


def test_procedural_cross_process_determinism():
    code = (
        "import hashlib;from multiflow.data import procedural_sample;"
        "img,c=procedural_sample(7,48,11);"
        "print(hashlib.sha256(img.tobytes()).hexdigest());print(c)"
    )
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "12345"  # a different str-hash seed must not matter
    src = str(Path(D.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    digest, caption = out.stdout.strip().split("\n")
    img, cap = procedural_sample(7, 48, 11)
    assert digest == hashlib.sha256(img.tobytes()).hexdigest()
    assert caption == cap


def test_captions_describe_drawn_shapes():
    seen_kinds, seen_counts, seen_templates = set(), set(), set()
    for i in range(60):
        layout = D._sample_layout(i, 64, 0)
        img, cap = procedural_sample(i, 64, 0)
        px = _pixels(img)
        assert cap.endswith(f"{layout['background']} background")
        assert 1 <= len(layout["shapes"]) <= 3
        seen_counts.add(len(layout["shapes"]))
        seen_templates.add(layout["template"])
        words = set(cap.split())
        assert layout["background"] in words
        for shape in layout["shapes"]:
            seen_kinds.add(shape["kind"])
            assert shape["color"] != layout["background"]
            assert shape["color"] in words
            assert shape["size"] in words
            assert D._SHAPES[shape["kind"]] in cap
            assert D._POSITIONS[shape["cell"]] in cap
        # the last drawn shape is on top: its centre pixel has its colour
        last = layout["shapes"][-1]
        cx, cy = (int(v) for v in last["center"])
        assert tuple(px[cy, cx]) == D._COLORS[last["color"]], (i, cap)
        # corners not covered by any shape show the background colour
        assert tuple(px[0, 0]) in {D._COLORS[layout["background"]]} | {
            D._COLORS[s["color"]] for s in layout["shapes"]
        }
    assert seen_kinds == set(D._SHAPES)
    assert seen_counts == {1, 2, 3}
    assert len(seen_templates) >= 4


def test_caption_example_format():
    layout = {
        "background": "yellow",
        "template": "a picture of {}",
        "background_phrase": "on a {} background",
        "shapes": [
            {"kind": "circle", "color": "red", "size": "large", "cell": 0},
            {"kind": "square", "color": "blue", "size": "small", "cell": 4},
        ],
    }
    assert D._caption(layout) == (
        "a picture of a large red circle at the top left and a small blue square in the center "
        "on a yellow background"
    )


def test_procedural_errors():
    with pytest.raises(ValueError, match="index"):
        procedural_sample(-1)
    with pytest.raises(ValueError, match="image_size"):
        procedural_sample(0, image_size=4)


def test_builtin_calibration_set():
    ds = BuiltinCalibrationSet(num_samples=5, image_size=32, seed=2)
    assert len(ds) == 5
    item = ds[3]
    assert set(item) == {"image", "caption"}
    assert item["image"].size == (32, 32)
    img, cap = procedural_sample(3, 32, 2)
    assert item["caption"] == cap and item["image"].tobytes() == img.tobytes()
    assert ds[-1]["caption"] == ds[4]["caption"]
    with pytest.raises(IndexError):
        ds[5]
    assert [it["caption"] for it in ds] == [procedural_sample(i, 32, 2)[1] for i in range(5)]
    with pytest.raises(ValueError, match="num_samples"):
        BuiltinCalibrationSet(num_samples=0)


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_basic_padding_and_mask():
    tok = SimpleTokenizer()
    out = tok(["A red circle.", "a picture of a blue square on a yellow background"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, :5].tolist() == [tok.bos_token_id, tok.vocab["a"], tok.vocab["red"], tok.vocab["circle"], tok.sep_token_id]
    assert ids[0, 5:].tolist() == [tok.pad_token_id] * 7
    assert mask[0].tolist() == [1] * 5 + [0] * 7
    assert mask[1].tolist() == [1] * 12
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.sep_token_id


def test_tokenizer_single_string_and_max_length_padding():
    tok = SimpleTokenizer(max_length=10)
    out = tok("hello world", padding="max_length")
    assert out["input_ids"].shape == (1, 10)
    assert out["attention_mask"].sum().item() == 4
    out = tok("hello world", padding="max_length", max_length=6)
    assert out["input_ids"].shape == (1, 6)
    lists = tok(["a", "a red"], padding=False, return_tensors=None)
    assert lists["input_ids"] == [[1, tok.vocab["a"], 2], [1, tok.vocab["a"], tok.vocab["red"], 2]]


def test_tokenizer_truncation_keeps_sep():
    tok = SimpleTokenizer(max_length=6)
    text = "one two three four five six seven eight"
    out = tok(text)
    assert out["input_ids"].shape == (1, 6)
    row = out["input_ids"][0].tolist()
    assert row[0] == tok.bos_token_id and row[-1] == tok.sep_token_id
    assert row[1:5] == [tok.token_id(w) for w in ["one", "two", "three", "four"]]
    assert tok(text, max_length=4)["input_ids"][0].tolist()[-1] == tok.sep_token_id
    assert len(tok.encode(text, truncation=False)) == 10


def test_tokenizer_ids_stable_and_in_range():
    tok = SimpleTokenizer(vocab_size=600)
    first = SimpleTokenizer.word_list
    assert tok.vocab[first[0]] == 4
    # unknown words hash into [4 + len(word_list), vocab_size), stably
    unknown = ["zyzzyva", "flibbertigibbet", "quokka", "xylograph", "mmmmm", "ünïcode"]
    ids = [tok.token_id(w) for w in unknown]
    assert all(4 + len(first) <= i < 600 for i in ids)
    assert ids == [SimpleTokenizer(vocab_size=600).token_id(w) for w in unknown]
    # fixed known values: crc32-based, independent of PYTHONHASHSEED
    import zlib

    start = 4 + len(first)
    assert tok.token_id("quokka") == start + zlib.crc32(b"quokka") % (600 - start)
    a = tok(["Quokka, zyzzyva!"])["input_ids"]
    b = tok(["quokka zyzzyva"])["input_ids"]
    assert torch.equal(a, b)


def test_tokenizer_covers_all_caption_words():
    tok = SimpleTokenizer()
    limit = 4 + len(SimpleTokenizer.word_list)
    for i in range(200):
        _, cap = procedural_sample(i, 32, 1)
        ids = tok(cap, max_length=128)["input_ids"][0].tolist()
        assert all(4 <= t < limit for t in ids[1:-1]), cap


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        SimpleTokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="max_length"):
        SimpleTokenizer(max_length=1)
    with pytest.raises(ValueError, match="distinct"):
        SimpleTokenizer(pad_token_id=1, bos_token_id=1)
    with pytest.raises(TypeError, match="index 1"):
        SimpleTokenizer()(["ok", 3])
    with pytest.raises(ValueError, match="padding"):
        SimpleTokenizer()("x", padding="bogus")


# ---------------------------------------------------------------------------
# JSON dataset
# ---------------------------------------------------------------------------


def _write_dataset(tmp_path: Path, entries, n_images=3, subdir="imgs"):
    root = tmp_path / subdir
    root.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
    for k in range(n_images):
        Image.new("RGB", (20 + k, 16), colours[k % 4]).save(root / f"im{k}.png")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    return path, root


def test_image_caption_dataset(tmp_path):
    entries = [
        {"image": "im0.png", "caption": "a red picture"},
        {"image": "im1.png", "caption": ["a green picture", "second caption"], "extra": 1},
        {"image": "im2.png", "caption": "a blue picture"},
    ]
    path, root = _write_dataset(tmp_path, entries)
    ds = ImageCaptionDataset(path, root)
    assert len(ds) == 3
    item = ds[1]
    assert item["caption"] == "a green picture"
    assert item["image"].mode == "RGB" and item["image"].size == (21, 16)
    assert _pixels(item["image"])[0, 0].tolist() == [0, 255, 0]
    assert ds[0]["caption"] == "a red picture"
    assert len(ImageCaptionDataset(path, root, max_samples=2)) == 2
    with pytest.raises(IndexError):
        ds[3]


def test_image_caption_dataset_grayscale_converted(tmp_path):
    root = tmp_path
    Image.new("L", (8, 8), 77).save(root / "g.png")
    (root / "a.json").write_text(json.dumps([{"image": "g.png", "caption": "grey"}]))
    img = ImageCaptionDataset(root / "a.json", root)[0]["image"]
    assert img.mode == "RGB" and _pixels(img)[0, 0].tolist() == [77, 77, 77]


def test_image_caption_dataset_missing_json(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ImageCaptionDataset(missing, tmp_path)


@pytest.mark.parametrize(
    "payload, bad_index",
    [
        ([{"image": "im0.png", "caption": "ok"}, {"image": "im1.png"}], 1),
        ([{"image": "im0.png", "caption": "ok"}, {"image": "im1.png", "caption": "ok"}, "oops"], 2),
        ([{"caption": "no image"}], 0),
        ([{"image": "im0.png", "caption": []}], 0),
        ([{"image": "im0.png", "caption": 5}], 0),
    ],
)
def test_image_caption_dataset_bad_entries(tmp_path, payload, bad_index):
    path, root = _write_dataset(tmp_path, payload)
    with pytest.raises(ValueError) as exc:
        ImageCaptionDataset(path, root)
    msg = str(exc.value)
    assert "ann.json" in msg and f"index {bad_index}" in msg


def test_image_caption_dataset_not_a_list_or_invalid_json(tmp_path):
    path, root = _write_dataset(tmp_path, {"image": "im0.png", "caption": "x"})
    with pytest.raises(ValueError, match="ann.json.*list"):
        ImageCaptionDataset(path, root)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ann.json"):
        ImageCaptionDataset(path, root)


def test_image_caption_dataset_empty(tmp_path):
    path, root = _write_dataset(tmp_path, [])
    with pytest.raises(ValueError, match="no samples"):
        ImageCaptionDataset(path, root)


def test_image_caption_dataset_missing_and_corrupt_image(tmp_path):
    entries = [
        {"image": "im0.png", "caption": "fine"},
        {"image": "sub/missing.png", "caption": "gone"},
        {"image": "broken.png", "caption": "broken"},
    ]
    path, root = _write_dataset(tmp_path, entries, n_images=1)
    (root / "broken.png").write_bytes(b"this is not a png")
    ds = ImageCaptionDataset(path, root)  # lazy: constructing works
    assert ds[0]["caption"] == "fine"
    with pytest.raises(ValueError, match="missing.png"):
        ds[1]
    with pytest.raises(ValueError, match="broken.png"):
        ds[2]


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------


def test_calibration_batches_builtin_shapes():
    ds = BuiltinCalibrationSet(num_samples=10, image_size=32)
    batches = calibration_batches(ds, batch_size=4, image_size=24, max_length=16)
    assert isinstance(batches, collections.abc.Sequence) and len(batches) == 3
    assert len(batches[:2]) == 2 and torch.equal(batches[-1]["input_ids"], batches[2]["input_ids"])
    with pytest.raises(IndexError):
        batches[3]
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 2]
    for b in batches:
        assert set(b) == {"pixel_values", "input_ids", "attention_mask"}
        assert b["pixel_values"].dtype == torch.float32
        assert b["pixel_values"].shape[1:] == (3, 24, 24)
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == b["pixel_values"].shape[0]
        assert b["input_ids"].shape[1] <= 16
        assert (b["input_ids"][:, 0] == 1).all()
    # deterministic and in dataset order
    again = calibration_batches(ds, batch_size=4, image_size=24, max_length=16)
    for b1, b2 in zip(batches, again):
        for k in b1:
            assert torch.equal(b1[k], b2[k])
    tok = SimpleTokenizer(max_length=16)
    expected = tok([ds[8]["caption"], ds[9]["caption"]])
    assert torch.equal(batches[2]["input_ids"], expected["input_ids"])
    assert torch.allclose(batches[2]["pixel_values"][1], preprocess_image(ds[9]["image"], 24))


def test_calibration_batches_num_batches_and_custom_tokenizer():
    ds = BuiltinCalibrationSet(num_samples=10, image_size=32)
    assert len(calibration_batches(ds, batch_size=3, num_batches=2, image_size=32)) == 2
    assert len(calibration_batches(ds, batch_size=3, num_batches=50, image_size=32)) == 4
    assert len(calibration_batches(ds, batch_size=100, image_size=32)) == 1
    tok = SimpleTokenizer(max_length=8, pad_token_id=3, unk_token_id=0)
    b = calibration_batches(ds, batch_size=5, image_size=32, tokenizer=tok, max_length=5)[0]
    assert b["input_ids"].shape == (5, 5)
    assert (b["input_ids"][:, -1] == tok.sep_token_id).all()


def test_calibration_batches_errors():
    ds = BuiltinCalibrationSet(num_samples=4, image_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        calibration_batches(ds, batch_size=0, image_size=32)
    with pytest.raises(ValueError, match="num_batches"):
        calibration_batches(ds, num_batches=0, image_size=32)
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([], image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        calibration_batches(ds)
    with pytest.raises(ValueError, match="item 0"):
        calibration_batches([{"img": 1}], image_size=8)


class _FakeProcessor:
    """Mimics the BlipProcessor call signature without transformers."""

    def __init__(self, size=16):
        self.size = size
        self.calls = []

    def __call__(self, images, text, return_tensors, padding, truncation, max_length):
        self.calls.append(dict(n=len(images), return_tensors=return_tensors, padding=padding,
                               truncation=truncation, max_length=max_length))
        n = len(images)
        return {
            "pixel_values": torch.zeros(n, 3, self.size, self.size, dtype=torch.float64),
            "input_ids": torch.ones(n, 5, dtype=torch.int32),
            "attention_mask": torch.ones(n, 5, dtype=torch.int32),
            "token_type_ids": torch.zeros(n, 5, dtype=torch.long),
        }


def test_calibration_batches_with_processor_protocol():
    ds = BuiltinCalibrationSet(num_samples=5, image_size=32)
    proc = _FakeProcessor()
    batches = calibration_batches(ds, batch_size=2, processor=proc, max_length=7)
    assert len(batches) == 3
    assert proc.calls[0] == dict(n=2, return_tensors="pt", padding=True, truncation=True, max_length=7)
    b = batches[0]
    assert set(b) == {"pixel_values", "input_ids", "attention_mask"}
    assert b["pixel_values"].dtype == torch.float32 and b["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="image_size"):
        calibration_batches(ds, processor=_FakeProcessor(16), image_size=24)
    with pytest.raises(ValueError, match="not both"):
        calibration_batches(ds, processor=proc, tokenizer=SimpleTokenizer())


def test_calibration_batches_with_real_blip_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(SimpleTokenizer.word_list)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(vocab))
    image_processor = transformers.BlipImageProcessor(size={"height": 40, "width": 40})
    proc = transformers.BlipProcessor(image_processor=image_processor, tokenizer=tok)
    ds = BuiltinCalibrationSet(num_samples=3, image_size=64)
    batches = calibration_batches(ds, batch_size=2, processor=proc, max_length=12, image_size=40)
    assert len(batches) == 2
    b = batches[0]
    assert b["pixel_values"].shape == (2, 3, 40, 40) and b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] <= 12
    assert b["attention_mask"].dtype == torch.long
    # built-in preprocessing matches the BLIP image processor
    ours = preprocess_image(ds[0]["image"], 40)
    assert torch.allclose(b["pixel_values"][0], ours, atol=1e-5)


# ---------------------------------------------------------------------------
# load_data
# ---------------------------------------------------------------------------


def test_load_data_builtin():
    for spec in (None, "builtin"):
        ds = load_data(spec, num_samples=7, image_size=32, seed=4)
        assert isinstance(ds, BuiltinCalibrationSet)
        assert len(ds) == 7 and ds.image_size == 32 and ds.seed == 4


def test_load_data_json_specs(tmp_path):
    entries = [{"image": f"imgs/im{k}.png", "caption": f"c{k}"} for k in range(3)]
    path, _ = _write_dataset(tmp_path, entries)
    ds = load_data(str(path), num_samples=None, image_size=32, seed=0)
    assert isinstance(ds, ImageCaptionDataset) and len(ds) == 3
    assert ds.image_root == tmp_path
    assert ds[2]["caption"] == "c2"
    assert len(load_data(str(path), num_samples=2, image_size=32, seed=0)) == 2

    # explicit image root
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((tmp_path / "imgs" / "im0.png").read_bytes())
    ann = tmp_path / "ann2.json"
    ann.write_text(json.dumps([{"image": "x.png", "caption": "explicit"}]))
    ds2 = load_data(f"{ann}:{other}", num_samples=None, image_size=32, seed=0)
    assert ds2.image_root == other and ds2[0]["caption"] == "explicit"

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_data(str(tmp_path / "missing.json"), num_samples=None, image_size=32, seed=0)
    with pytest.raises(ValueError, match="unrecognised"):
        load_data("coco-please", num_samples=None, image_size=32, seed=0)


def test_calibration_batches_hold_one_batch_at_a_time():
    """The batches are built when asked for (each sample read once up front, checked, then
    again by its batch): nothing of the calibration set is held between batches."""
    ds = BuiltinCalibrationSet(num_samples=12, image_size=32)
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            reads.append(i)
            return ds[i]

    batches = calibration_batches(Counting(), batch_size=4, image_size=24)
    up_front = len(reads)
    assert up_front == 12 + 4  # the check of every sample, and the first batch
    first = [b["pixel_values"] for b in batches]
    assert len(reads) == up_front + 12
    second = [b["pixel_values"] for b in batches]  # built again, the same
    assert len(reads) == up_front + 24 and all(torch.equal(a, b) for a, b in zip(first, second))
