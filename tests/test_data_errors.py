"""Bad input: each error names the file or option and what was expected."""
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from allspark_jax import errors
from allspark_jax.commands import predict
from allspark_jax.data import input_pipeline
from allspark_jax.data import prepare
from conftest import make_options

DataError = errors.DataError


@pytest.fixture()
def broken(data_synthetic_root, tmp_path):
    """A copy of the synthetic root whose labeled list holds only train_00000 (to be broken)."""
    root = str(tmp_path / "root")
    shutil.copytree(data_synthetic_root, root)
    with open(os.path.join(root, "splits", "default", "labeled.txt"), "w") as f:
        f.write("JPEGImages/train_00000.jpg SegmentationClass/train_00000.png\n")
    return root


def _config(root, **overrides):
    """The DataOptions of the synthetic dataset at `root` (5 classes) with `overrides`."""
    data = {"name": "synthetic", "root": root, "split": "default", "num_classes": 5,
            "crop_size": 32, "batch_size": 2}
    data.update(overrides)
    return make_options(0, **data)


def _first_batch(config):
    return next(iter(input_pipeline.create_train_iterator(config, process_index=0, process_count=1)))


def test_missing_root():
    with pytest.raises(DataError, match=r"data.root='/nonexistent/root' does not exist"):
        input_pipeline.create_train_iterator(_config("/nonexistent/root"), process_index=0,
                                             process_count=1)
    with pytest.raises(DataError, match="data.root is not set"):
        input_pipeline.create_val_dataset(_config(None, name="pascal"), process_index=0,
                                          process_count=1)


def test_missing_file_is_named_eagerly(broken):
    os.remove(os.path.join(broken, "SegmentationClass", "train_00000.png"))
    with pytest.raises(DataError, match=r"missing under data.root.*train_00000.png"):
        input_pipeline.create_train_iterator(_config(broken), process_index=0, process_count=1)


def test_unreadable_image_names_the_file(broken):
    with open(os.path.join(broken, "JPEGImages", "train_00000.jpg"), "wb") as f:
        f.write(b"this is not an image")
    with pytest.raises(DataError, match=r"Unreadable image.*train_00000.jpg"):
        _first_batch(_config(broken))


def test_size_mismatch_names_both_files(broken):
    path = os.path.join(broken, "SegmentationClass", "train_00000.png")
    m = Image.open(path)
    m.crop((0, 0, m.size[0] - 3, m.size[1])).save(path)
    with pytest.raises(DataError, match=r"size mismatch.*train_00000.jpg.*train_00000.png"):
        _first_batch(_config(broken))


def test_label_out_of_range_names_the_file(broken):
    path = os.path.join(broken, "SegmentationClass", "train_00000.png")
    labels = np.asarray(Image.open(path)).copy()
    labels[3:6, 3:6] = 9
    Image.fromarray(labels, mode="L").save(path)
    with pytest.raises(DataError, match=r"label outside \[0, 4\].*train_00000.png"):
        _first_batch(_config(broken))
    # ... and at TFDS build time
    with pytest.raises(DataError, match=r"train_00000.png.*label 9"):
        prepare.prepare("synthetic", broken, os.path.join(broken, "tfds"))


def test_bad_options(data_synthetic_root, tmp_path):
    root = data_synthetic_root
    cases = [
        (dict(split="1_3"), r"data.split='1_3' is not a split of dataset 'synthetic'.*default"),
        (dict(name="imagenet"), r"data.name='imagenet' is not a known dataset"),
        (dict(num_classes=21), r"data.num_classes=21"),
        (dict(batch_size=3), r"data.batch_size=3"),
        (dict(batch_size=64), r"fewer than data.batch_size=64"),
        (dict(student_view="both"), r"data.student_view='both'"),
        (dict(source="lmdb"), r"data.source='lmdb'"),
        (dict(cutmix_prob=1.5), r"data.cutmix_prob=1.5"),
        (dict(unlabeled_split=str(tmp_path / "none.txt")), r"none.txt.*does not exist"),
        (dict(source="tfds", tfds_data_dir=str(tmp_path)), r"no prepared allspark_synthetic"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            input_pipeline.create_train_iterator(_config(root, **overrides), process_index=0,
                                                 process_count=2)
    with pytest.raises(DataError, match=r"data.val_split='test'"):
        input_pipeline.create_val_dataset(_config(root, val_split="test"), process_index=0,
                                          process_count=1)
    with pytest.raises(DataError, match=r"data.split='1_3' is not a split of dataset 'pascal'"):
        input_pipeline.train_plan(_config(root, name="pascal", num_classes=21, split="1_3"))


# ------------------------------------------------------- corrupt contents (valid magic bytes)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _randomize(path, keep=64):
    """Keeps the first `keep` bytes (magic and headers) and replaces the rest by random bytes."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep] + np.random.default_rng(0).bytes(len(data) - keep))


def _assert_clean(message):
    """A DataError message of ours: no TensorFlow graph or node text."""
    assert "{{" not in message and "[[" not in message and "Traceback" not in message, message


def _with_unlabeled(root, lines):
    with open(os.path.join(root, "splits", "default", "unlabeled.txt"), "w") as f:
        f.writelines(f"{line}\n" for line in lines)


@pytest.mark.parametrize("what,corrupt,pattern", [
    ("image", _truncate, r"cannot read image '.*JPEGImages/train_00000.jpg' \(jpeg::Uncompress failed"),
    ("image", _randomize, r"cannot read image '.*JPEGImages/train_00000.jpg' \(jpeg::Uncompress failed"),
    ("mask", _truncate, r"cannot read mask '.*SegmentationClass/train_00000.png' \(.*PNG"),
])
def test_corrupt_labeled_file_in_training_names_it(broken, what, corrupt, pattern):
    rel = {"image": "JPEGImages/train_00000.jpg", "mask": "SegmentationClass/train_00000.png"}[what]
    corrupt(os.path.join(broken, rel))
    with pytest.raises(DataError, match=r"training input pipeline: step 0: " + pattern) as e:
        _first_batch(_config(broken))
    _assert_clean(str(e.value))


def test_corrupt_unlabeled_image_in_training_names_it_and_the_step(broken):
    # one of the two steps of each epoch holds the corrupt image (with seed 0, in epoch 1 the second);
    # the error must name the step at which the iterator fails, after yielding the batches before it
    _with_unlabeled(broken, ["JPEGImages/train_00003.jpg"] * 3 + ["JPEGImages/train_00004.jpg"])
    _randomize(os.path.join(broken, "JPEGImages", "train_00004.jpg"))
    it = input_pipeline.create_train_iterator(_config(broken), start_step=2, process_index=0,
                                              process_count=1)
    yielded = 0
    with pytest.raises(DataError) as e:
        for _ in it:
            yielded += 1
    assert yielded == 1
    assert re.fullmatch(rf"training input pipeline: step {2 + yielded}: cannot read image "
                        r"'.*train_00004.jpg' \(jpeg::Uncompress failed.*\); expected an intact "
                        r"JPEG or PNG file", str(e.value)), str(e.value)


# JPEG frame header (SOFn) markers: 0xC0..0xCF but DHT (C4), JPG (C8) and DAC (CC).
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _declare_size(path, height, width):
    """Rewrites the size that a JPEG's frame header or a PNG's IHDR declares (with the IHDR's CRC,
    so a decoder would believe it); the pixel data stays as it is."""
    data = bytearray(open(path, "rb").read())
    if data[:4] == b"\x89PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:
        pos = 2
        while data[pos + 1] not in SOF_MARKERS:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("what", ["image", "mask"])
def test_a_header_declaring_a_huge_size_fails_before_decoding(broken, what):
    """60000 x 60000 (10.8 GB of RGB) declared by a tiny file: refused from its header."""
    rel = {"image": "JPEGImages/train_00000.jpg", "mask": "SegmentationClass/train_00000.png"}[what]
    _declare_size(os.path.join(broken, rel), 60000, 60000)
    with pytest.raises(DataError, match=rf"training input pipeline: step 0: {what.capitalize()} "
                       r"too large \(expected at most 100000000 pixels, data.max_image_pixels\): "
                       rf".*{rel}.* header declares height, width: \[?60000 60000") as e:
        _first_batch(_config(broken))
    _assert_clean(str(e.value))


@pytest.mark.parametrize("fmt,options", [
    ("JPEG", {}), ("JPEG", {"progressive": True, "exif": b"Exif\0\0" + bytes(300)}),
    ("PNG", {}), ("PNG", {"mode": "L"})])
def test_header_size_is_the_decoded_size_and_the_bound_is_inclusive(tmp_path, fmt, options):
    import tensorflow as tf
    from allspark_jax.data import augment
    options = dict(options)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8))
    path = str(tmp_path / f"image.{fmt.lower()}")
    image.convert(options.pop("mode", "RGB")).save(path, format=fmt, **options)
    data = tf.io.read_file(path)
    assert augment.header_size(data).numpy().tolist() == [37, 53]
    assert augment.decode_image(data, tf.constant(path), 37 * 53).shape == (37, 53, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Image too large \(expected at most "
                                                           r"1960 pixels"):
        augment.decode_image(data, tf.constant(path), 37 * 53 - 1)


def _cityscapes_root(root, rng):
    """A tiny Cityscapes layout (PNG images, labelTrainIds masks): 2 labeled, 2 unlabeled, 2 val."""
    lines = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        stem = f"aachen_{i:06d}_000019"
        image = f"leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png"
        mask = f"gtFine/{split}/aachen/{stem}_gtFine_labelTrainIds.png"
        for rel in (image, mask):
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
            os.path.join(root, image))
        Image.fromarray(rng.integers(0, 19, (24, 40)).astype(np.uint8), mode="L").save(
            os.path.join(root, mask))
        lines.append(f"{image} {mask}\n")
    for name, part in (("labeled", lines[:2]), ("unlabeled", lines[2:4]), ("val", lines[4:])):
        with open(os.path.join(root, f"{name}.txt"), "w") as f:
            f.writelines(part)
    return [line.split() for line in lines]


def _cityscapes_options(root, **overrides):
    data = {"name": "cityscapes", "root": root, "split": os.path.join(root, "labeled.txt"),
            "unlabeled_split": os.path.join(root, "unlabeled.txt"),
            "val_split": os.path.join(root, "val.txt"), "num_classes": 19, "crop_size": 16,
            "batch_size": 2}
    data.update(overrides)
    return make_options(0, **data)


def _val_errors(opts):
    """The DataError message of walking the validation examples (as the evaluation does)."""
    examples, count = input_pipeline.create_val_iterator(opts, process_index=0, process_count=1)
    assert count == 2
    with pytest.raises(DataError) as e:
        list(examples)
    _assert_clean(str(e.value))
    return str(e.value)


def test_validation_errors_name_the_file(tmp_path):
    root = str(tmp_path)
    pairs = _cityscapes_root(root, np.random.default_rng(0))
    val_image, val_mask = (os.path.join(root, p) for p in pairs[5])
    good = np.asarray(Image.open(val_mask))

    _randomize(val_image)
    assert re.search(r"validation input pipeline: cannot read image '.*aachen_000005_000019_"
                     r"leftImg8bit.png' \(.*PNG.*\); expected an intact JPEG or PNG file",
                     _val_errors(_cityscapes_options(root)))
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(val_image)
    bad = good.copy()
    bad[0, 0] = 19
    Image.fromarray(bad, mode="L").save(val_mask)
    assert re.search(r"label outside \[0, 18\].*aachen_000005_000019_gtFine_labelTrainIds.png",
                     _val_errors(_cityscapes_options(root)))
    Image.fromarray(good[:, :-1], mode="L").save(val_mask)
    assert re.search(r"size mismatch.*_leftImg8bit.png.*_labelTrainIds.png",
                     _val_errors(_cityscapes_options(root)))
    # max_images: only the first list position is read, so the bad second one is never touched
    examples, count = input_pipeline.create_val_iterator(
        _cityscapes_options(root), process_index=0, process_count=1, max_images=1)
    assert count == 1 and [int(x["index"]) for x in examples] == [0]


def test_check_files_decode_names_every_bad_file_at_once(tmp_path):
    root = str(tmp_path)
    pairs = _cityscapes_root(root, np.random.default_rng(1))
    path = lambda i, j: os.path.join(root, pairs[i][j])
    _truncate(path(0, 0))  # labeled image
    labels = np.asarray(Image.open(path(1, 1))).copy()
    labels[2, 2] = 40
    Image.fromarray(labels, mode="L").save(path(1, 1))  # labeled mask: label out of range
    _randomize(path(3, 0))  # unlabeled image
    _truncate(path(3, 1))  # ... whose mask is never read
    Image.fromarray(np.zeros((22, 40), np.uint8), mode="L").save(path(4, 1))  # val: size mismatch
    Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(path(5, 0), format="GIF")  # val: not JPEG/PNG

    input_pipeline.train_plan(_cityscapes_options(root))  # 'exist' (default) reads no contents
    with pytest.raises(DataError) as e:
        input_pipeline.train_plan(_cityscapes_options(root, check_files="decode"), progress=True)
    message = str(e.value)
    _assert_clean(message)
    lines = message.splitlines()
    assert lines[0] == "5 bad data file(s) (data.check_files='decode'):", message
    expected = [rf"cannot read image '{re.escape(path(0, 0))}' \(Invalid PNG data",
                rf"label outside \[0, 18\].*{re.escape(path(1, 1))}",
                rf"cannot read image '{re.escape(path(3, 0))}' \(",
                rf"size mismatch.*{re.escape(path(4, 0))}.*{re.escape(path(4, 1))}",
                rf"Unreadable image \(expected a JPEG or PNG file\): {re.escape(path(5, 0))}"]
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in lines[1:]) == 1, (pattern, message)
    # eval mode checks the val list alone
    with pytest.raises(DataError, match=r"2 bad data file\(s\)"):
        input_pipeline.check_val_files(_cityscapes_options(root, check_files="decode"))
    input_pipeline.check_val_files(_cityscapes_options(root))  # 'exist': nothing decoded
    # 'none' skips even the existence check
    os.remove(path(2, 0))
    with pytest.raises(DataError, match="missing under data.root"):
        input_pipeline.train_plan(_cityscapes_options(root))
    input_pipeline.train_plan(_cityscapes_options(root, check_files="none"))


def test_predict_names_an_unreadable_image(tmp_path):
    path = str(tmp_path / "photo.jpg")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(str(tmp_path / "photo.png"))
    assert predict.load_image(str(tmp_path / "photo.png"), 600)[0].shape == (20, 30, 3)
    rgb, image = predict.load_image(path)
    assert rgb.shape == (20, 30, 3) and image.dtype == np.float32
    _truncate(path)
    with pytest.raises(DataError, match=r"cannot read image '.*photo.jpg' \(OSError: .*\); "
                                        r"expected an intact image file"):
        predict.load_image(path)
    with pytest.raises(DataError, match=r"image '.*photo.png' too large: its header declares 20 x 30 "
                                        r"pixels; expected at most 599 \(data.max_image_pixels\)"):
        predict.load_image(str(tmp_path / "photo.png"), 599)
