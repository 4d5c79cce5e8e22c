"""The synthetic renderer's style knobs: the default output is the original task's bit for bit,
each knob does what its docstring says, and the config threads them to the written dataset."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from allspark_jax import config as config_lib
from allspark_jax.data import synthetic
from allspark_jax.errors import DataError

# sha256 over the (image, labels) bytes of `_original_renders()`, computed with the renderer as it
# was before `Style` existed: the knobs at their defaults must not move one bit of the original
# task (the learning benchmark's, the demo's and the tests' datasets).
ORIGINAL_SHA256 = "8fe7e938283414a4de7bea552992ade02a0db0b27a65d523156360d3c0a617e1"


def _original_renders(**style):
    """The 5-class task's first 6 training images (seed 0) and the 9-class source task's first 6
    validation images (seed 1000), 80 px."""
    return ([synthetic.render(i, "train", 80, 5, 0, **style) for i in range(6)]
            + [synthetic.render(i, "val", 80, 9, 1000, **style) for i in range(6)])


def _sha256(examples) -> str:
    h = hashlib.sha256()
    for image, labels in examples:
        h.update(image.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()


def test_the_default_style_renders_the_original_task_bit_for_bit():
    assert _sha256(_original_renders()) == ORIGINAL_SHA256
    explicit = synthetic.Style(colours=0, max_objects=3, distractors=0, hue_jitter=0.0)
    assert _sha256(_original_renders(style=explicit)) == ORIGINAL_SHA256
    # the style keys of configs/default.py are that same style
    assert config_lib.synthetic_style(config_lib.load_config("configs/default.py")) == explicit


REGIME = synthetic.Style(colours=2, max_objects=4, distractors=2, hue_jitter=0.1)


def test_styled_renders_are_deterministic_and_differ_from_the_original():
    first = [synthetic.render(i, "train", 80, 7, 26, REGIME) for i in range(4)]
    again = [synthetic.render(i, "train", 80, 7, 26, REGIME) for i in range(4)]
    assert _sha256(first) == _sha256(again)
    plain = [synthetic.render(i, "train", 80, 7, 26) for i in range(4)]
    assert _sha256(first) != _sha256(plain)
    # the sizes, the background and the objects' places are the original draws
    assert [im.shape for im, _ in first] == [im.shape for im, _ in plain]


def test_shared_colours_leave_shape_or_stripes_to_tell_classes_apart():
    styles = {k: synthetic.class_style(k, 7, colours=2) for k in range(1, 7)}
    for k, st in styles.items():
        same_hue = [j for j in styles if j != k and styles[j]["hue"] == st["hue"]]
        assert len(same_hue) == 2  # three classes per hue
        for j in same_hue:
            other = styles[j]
            assert (other["shape"], other["period"], other["angle"]) != (
                st["shape"], st["period"], st["angle"])
    assert {round(st["hue"], 6) for st in styles.values()} == {0.0, 0.5}
    # the default gives every class its own hue
    assert len({synthetic.class_style(k, 7)["hue"] for k in range(1, 7)}) == 6
    assert synthetic.custom_palette(7, colours=2)[1] == synthetic.custom_palette(7, colours=2)[3]


def _object_pixels(image, labels, k):
    return image[labels == k].astype(float)


def test_hue_jitter_shifts_each_images_object_colours():
    style = synthetic.Style(colours=2, hue_jitter=0.2)
    means = {}
    for i in range(40):
        image, labels = synthetic.render(i, "train", 80, 3, 5, style)
        plain_image, plain_labels = synthetic.render(i, "train", 80, 3, 5,
                                                     synthetic.Style(colours=2))
        np.testing.assert_array_equal(labels, plain_labels)  # only the colours move
        if (labels == 1).sum() > 50:
            means[i] = _object_pixels(image, labels, 1).mean(0)
    spread = np.std(np.stack(list(means.values())), axis=0)
    assert len(means) >= 5 and spread.max() > 15  # RGB means of class 1 move from image to image
    # without jitter one class has one colour (stripes and noise aside)
    fixed = [_object_pixels(*synthetic.render(i, "train", 80, 3, 5, synthetic.Style(colours=2)),
                            1).mean(0) for i in means]
    assert np.std(np.stack(fixed), axis=0).max() < 6


def test_distractors_are_background_and_occlude_objects():
    style = synthetic.Style(distractors=3)
    changed = 0
    for i in range(12):
        image, labels = synthetic.render(i, "train", 80, 5, 0, style)
        plain_image, plain_labels = synthetic.render(i, "train", 80, 5, 0)
        moved = labels != plain_labels
        # clutter only ever removes object pixels (to background or a new border), never adds one
        assert set(np.unique(labels[moved])) <= {0, 255}
        changed += int((image != plain_image).any())
    assert changed >= 8  # 0..3 clutter shapes per image: most images get at least one


def test_max_objects_bounds_the_objects_per_image():
    for i in range(20):
        _, labels = synthetic.render(i, "train", 80, 21, 0, synthetic.Style(max_objects=1))
        assert len(set(np.unique(labels)) - {0, 255}) <= 1
    counts = [len(set(np.unique(synthetic.render(i, "train", 80, 21, 0,
                                                 synthetic.Style(max_objects=6))[1])) - {0, 255})
              for i in range(20)]
    assert max(counts) > 3  # more than the original's at most 3


@pytest.mark.parametrize("style,message", [
    (dict(colours=-1), r"--colours=-1: expected an integer >= 0"),
    (dict(max_objects=0), r"--max_objects=0: expected an integer >= 1"),
    (dict(distractors=1.5), r"--distractors=1.5: expected an integer >= 0"),
    (dict(hue_jitter=0.7), r"--hue_jitter=0.7: expected a fraction of the hue circle in \[0, 0.5\]"),
])
def test_bad_style_is_named(tmp_path, style, message):
    with pytest.raises(ValueError, match=message):
        synthetic.write_dataset(str(tmp_path), 4, 2, 32, 5, style=synthetic.Style(**style))


@pytest.mark.parametrize("key,value,message", [
    ("colours", -2, r"config.data.synthetic.colours=-2: expected an integer >= 0"),
    ("max_objects", 0, r"config.data.synthetic.max_objects=0: expected an integer >= 1"),
    ("hue_jitter", 0.75, r"config.data.synthetic.hue_jitter=0.75: expected a number >= 0.0 and "
                         r"<= 0.5"),
])
def test_bad_style_keys_are_named_by_validation(key, value, message):
    config = config_lib.load_config("configs/demo.py")
    config.data.synthetic[key] = value
    with pytest.raises(DataError, match=message):
        config_lib.validate(config)


def test_the_config_style_reaches_the_written_dataset(tmp_path):
    config = config_lib.load_config("configs/demo.py")
    config.data.synthetic.update(num_train=6, num_labeled=2, num_val=2, size=40, seed=3,
                                 colours=2, max_objects=4, distractors=2, hue_jitter=0.1)
    opts = config_lib.data_options(config, str(tmp_path))
    style = synthetic.Style(colours=2, max_objects=4, distractors=2, hue_jitter=0.1)
    for i in range(6):
        with open(f"{opts.root}/SegmentationClass/train_{i:05d}.png", "rb") as f:
            written = np.asarray(Image.open(f))
        np.testing.assert_array_equal(written, synthetic.render(i, "train", 40, 5, 3, style)[1])


def test_the_command_line_takes_the_style(tmp_path):
    synthetic.main(["--root", str(tmp_path), "--num_train", "4", "--num_val", "1", "--size", "40",
                    "--num_classes", "7", "--seed", "2", "--colours", "2", "--max_objects", "4",
                    "--distractors", "2", "--hue_jitter", "0.1"])
    with open(tmp_path / "SegmentationClass" / "train_00001.png", "rb") as f:
        written = np.asarray(Image.open(f))
    style = synthetic.Style(colours=2, max_objects=4, distractors=2, hue_jitter=0.1)
    np.testing.assert_array_equal(written, synthetic.render(1, "train", 40, 7, 2, style)[1])


def test_a_dataset_written_with_other_settings_is_not_reused(tmp_path):
    """`ensure_dataset` writes once; the same settings reuse the folder, other settings (a count, a
    seed, a style knob) are refused naming the setting, and nothing is overwritten."""
    root = str(tmp_path / "data")
    spec = dict(num_train=6, num_val=2, size=32, num_classes=3, seed=1, num_labeled=2)
    assert synthetic.ensure_dataset(root, **spec)
    first = (tmp_path / "data" / "JPEGImages" / "train_00000.jpg").read_bytes()
    assert not synthetic.ensure_dataset(root, **spec)
    assert not synthetic.ensure_dataset(root, **spec, style=synthetic.Style())  # the default style
    for change, message in (
            ({"seed": 2}, "written with seed=1, not the 2 asked for"),
            ({"num_labeled": 3}, "written with num_labeled=2, not the 3 asked for"),
            ({"style": synthetic.Style(hue_jitter=0.05)},
             "written with hue_jitter=0.0, not the 0.05 asked for")):
        with pytest.raises(DataError, match="synthetic.json: this synthetic dataset") as e:
            synthetic.ensure_dataset(root, **{**spec, **change})
        assert message in str(e.value)
    assert (tmp_path / "data" / "JPEGImages" / "train_00000.jpg").read_bytes() == first
