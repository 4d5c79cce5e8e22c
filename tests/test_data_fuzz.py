"""Seeded mutations of valid images and masks: each reads correctly or fails with DataError naming it.

The valid originals are small files in the Pascal layout: a JPEG and a PNG image, a grayscale and a
VOC-palette label PNG. Mutations keep the magic bytes: truncation, a flipped bit, two overwritten
bytes, inserted or deleted bytes, or random bytes after the headers. Every mutant goes through
`data.check_files='decode'` (the check before training, which decodes as the pipelines decode);
pairs it passes must then read through the validation iterator, a sample of those it names must
fail there with the same message, and every mutated image goes through predict's image reader.
"""
import io
import os

import numpy as np
from PIL import Image

from allspark_jax.commands import predict
from allspark_jax.data import input_pipeline
from allspark_jax.data import synthetic
from allspark_jax.data.datasets import IGNORE_INDEX
from allspark_jax.errors import DataError
from conftest import make_options

SEED = 14
MUTANTS = 160
NUM_CLASSES = 21
RECHECKED = 8  # bad pairs read again one at a time through the validation iterator


def _originals(rng) -> tuple[dict[str, bytes], np.ndarray]:
    """({'jpg', 'png'}: the image, 'gray': the labels, encoded), labels of one 24 x 32 example."""
    h, w = 24, 32
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([yy * 10, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)
    image = (image + rng.integers(0, 30, image.shape)).astype(np.uint8)
    labels = (xx // 6 + 3 * (yy // 8)).astype(np.uint8) % NUM_CLASSES
    labels[0] = IGNORE_INDEX
    out = {}
    for key, im, fmt in (("jpg", image, "JPEG"), ("png", image, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format=fmt)
        out[key] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG")
    out["gray"] = buf.getvalue()
    return out, labels


def _mutate(data: bytes, rng) -> bytes:
    n = len(data)
    pos = int(rng.integers(4, n))  # past the magic bytes
    kind = int(rng.integers(6))
    if kind == 0:  # truncated
        return data[:pos]
    if kind == 1:  # one flipped bit
        return data[:pos] + bytes([data[pos] ^ (1 << int(rng.integers(8)))]) + data[pos + 1:]
    if kind == 2:  # two overwritten bytes
        return data[:pos] + rng.bytes(2) + data[pos + 2:]
    if kind == 3:  # inserted bytes
        return data[:pos] + rng.bytes(int(rng.integers(1, 9))) + data[pos:]
    if kind == 4:  # deleted bytes
        return data[:pos] + data[pos + int(rng.integers(1, 9)):]
    keep = int(rng.integers(8, n // 2))  # random bytes after the headers
    return data[:keep] + rng.bytes(n - keep)


def _write_mutants(root: str):
    """Writes MUTANTS pairs, each with one mutated file; returns (val list path, pairs, mutated)."""
    rng = np.random.default_rng(SEED)
    originals, labels = _originals(rng)
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    palette = os.path.join(root, "palette.png")
    synthetic.save_palette_png(labels, palette)
    with open(palette, "rb") as f:
        originals["palette"] = f.read()
    pairs, mutated = [], []
    for i in range(MUTANTS):
        kind = ("jpg", "png", "gray", "palette")[i % 4]
        image_kind = kind if kind in ("jpg", "png") else ("jpg", "png")[(i // 4) % 2]
        mask_kind = kind if kind in ("gray", "palette") else ("gray", "palette")[(i // 4) % 2]
        image = f"JPEGImages/m_{i:03d}.{image_kind}"
        mask = f"SegmentationClass/m_{i:03d}.png"
        for rel, key in ((image, image_kind), (mask, mask_kind)):
            data = originals[key]
            if key == kind:
                data = _mutate(data, rng)
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
        pairs.append((image, mask))
        mutated.append(image if kind == image_kind else mask)
    return pairs, mutated


def _write_list(root, name, pairs) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.writelines(f"{image} {mask}\n" for image, mask in pairs)
    return path


def _options(root, val_list):
    return make_options(0, name="pascal", root=root, num_classes=NUM_CLASSES, val_split=val_list,
                        check_files="decode")


def test_mutated_images_and_masks_read_or_fail_with_data_error(tmp_path):
    root = str(tmp_path)
    pairs, mutated = _write_mutants(root)
    try:
        input_pipeline.check_val_files(_options(root, _write_list(root, "all.txt", pairs)))
        lines = []
    except DataError as e:
        header, *lines = str(e).splitlines()
        assert header == f"{len(lines)} bad data file(s) (data.check_files='decode'):"
    # every line names the mutated file of exactly one pair
    bad = {}
    for line in lines:
        hits = [i for i, m in enumerate(mutated) if os.path.join(root, m) in line]
        assert len(hits) == 1 and "{{" not in line and "[[" not in line, line
        bad[hits[0]] = line.strip()
    assert len(bad) == len(lines)
    good = [i for i in range(MUTANTS) if i not in bad]
    assert 0 < len(bad) < MUTANTS and len(good) > 10, (len(bad), len(good))

    # pairs the check passes read through the validation iterator, labels in range
    examples, count = input_pipeline.create_val_iterator(
        _options(root, _write_list(root, "good.txt", [pairs[i] for i in good])),
        process_index=0, process_count=1)
    n = 0
    for ex in examples:
        assert ex["image"].shape[:2] == ex["mask"].shape and ex["image"].shape[2] == 3
        m = ex["mask"]
        assert ((m < NUM_CLASSES) | (m == IGNORE_INDEX)).all()
        n += 1
    assert n == count == len(good)

    # a sample of the bad pairs fails in the validation iterator with the check's own message
    rng = np.random.default_rng(SEED)
    for i in rng.choice(sorted(bad), size=min(RECHECKED, len(bad)), replace=False):
        examples, _ = input_pipeline.create_val_iterator(
            _options(root, _write_list(root, f"bad_{i}.txt", [pairs[i]])), process_index=0,
            process_count=1)
        try:
            list(examples)
        except DataError as e:
            assert str(e) == f"validation input pipeline: {bad[i]}", (str(e), bad[i])
        else:
            raise AssertionError(f"{pairs[i]} was named by the check but read: {bad[i]}")

    # predict's reader: every mutated image reads as an RGB array or fails naming the file
    outcomes = {"read": 0, "failed": 0}
    for i in range(MUTANTS):
        if not mutated[i].startswith("JPEGImages/"):
            continue
        path = os.path.join(root, mutated[i])
        try:
            rgb, image = predict.load_image(path)
        except DataError as e:
            assert path in str(e)
            outcomes["failed"] += 1
        else:
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and image.shape == rgb.shape
            outcomes["read"] += 1
    assert outcomes["read"] and outcomes["failed"], outcomes
