"""Custom datasets (data.name='custom'): the synthetic writer's custom layout through the pipeline,
the ignore value and palette masks, and each bad option or file named."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from allspark_jax import config as config_lib
from allspark_jax.data import input_pipeline, synthetic
from allspark_jax.errors import DataError

IGNORE = 200  # the mask value of ignored pixels in the written files


@pytest.fixture(scope="module")
def custom_roots(tmp_path_factory):
    """The same 10 + 3 images in the custom layout: grayscale masks, and palette masks."""
    roots = {}
    for kind in ("gray", "palette"):
        root = str(tmp_path_factory.mktemp(f"custom_{kind}"))
        synthetic.write_dataset(root, num_train=10, num_val=3, size=40, num_classes=5, seed=0,
                                num_labeled=3, layout="custom", ignore_index=IGNORE,
                                palette_masks=kind == "palette")
        roots[kind] = root
    return roots


def custom_config(root, **overrides):
    """configs/custom.py on `root` (5 classes, small crops) with dotted-key `overrides`."""
    config = config_lib.load_config("configs/custom.py")
    config.data.root = root
    config.data.num_classes = 5
    config.data.crop_size = 32
    config.data.batch_size = 2
    config.data.custom.ignore_index = IGNORE
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def options(root, **overrides):
    config = custom_config(root, **overrides)
    config_lib.validate(config)
    return config_lib.data_options(config)


def first_batch(opts):
    return next(input_pipeline.create_train_iterator(opts, process_index=0, process_count=1))


def val_masks(opts):
    ds = input_pipeline.create_val_dataset(opts, process_index=0, process_count=1)
    return [ex["mask"] for ex in ds.as_numpy_iterator()]


def test_layout_lists_and_classes(custom_roots):
    root = custom_roots["gray"]
    with open(os.path.join(root, "unlabeled.txt")) as f:
        assert all(len(line.split()) == 1 for line in f)  # the image alone
    opts = options(root)
    assert opts.class_names == tuple(synthetic.class_names(5)) and opts.palette is None
    assert opts.ignore_index == IGNORE
    batch = first_batch(opts)
    assert batch["image_l"].shape == (2, 32, 32, 3) and batch["image_u_w"].shape == (2, 32, 32, 3)
    assert set(np.unique(batch["mask_l"])) <= {0, 1, 2, 3, 4, 255}


def test_ignore_value_becomes_255_and_palette_masks_decode(custom_roots):
    files = []
    with open(os.path.join(custom_roots["gray"], "val.txt")) as f:
        for line in f:
            files.append(np.asarray(Image.open(os.path.join(custom_roots["gray"],
                                                            line.split()[1]))))
    expected = [np.where(m == IGNORE, 255, m) for m in files]
    assert all((m == IGNORE).any() for m in files)  # the borders are ignored pixels
    for got, want in zip(val_masks(options(custom_roots["gray"])), expected):
        np.testing.assert_array_equal(got, want)
    opts = options(custom_roots["palette"], **{"data.custom.palette": "palette.txt"})
    assert opts.palette == tuple(synthetic.custom_palette(5))
    for got, want in zip(val_masks(opts), expected):
        np.testing.assert_array_equal(got, want)


def test_palette_masks_need_the_palette(custom_roots):
    # Without data.custom.palette, palette PNGs are read as VOC colours, which these are not.
    with pytest.raises(DataError, match=r"colours outside the VOC palette.*masks/train/"):
        first_batch(options(custom_roots["palette"]))


def test_ignore_value_must_be_declared(custom_roots):
    with pytest.raises(DataError, match=r"Mask label outside \[0, 4\] and not 255.*masks/train/"):
        first_batch(options(custom_roots["gray"], **{"data.custom.ignore_index": 255}))


@pytest.mark.parametrize("overrides,message", [
    ({"data.custom.class_names": None}, r"config.data.custom.class_names=None: expected the path"),
    ({"data.custom.ignore_index": 3}, r"ignore_index=3: expected a mask value no class uses "
                                      r"\(>= data.num_classes = 5\)"),
    ({"data.source": "tfds"}, r"config.data.source='tfds': expected 'files' for data.name == 'custom'"),
])
def test_bad_options_are_named(custom_roots, overrides, message):
    with pytest.raises(DataError, match=message):
        config_lib.validate(custom_config(custom_roots["gray"], **overrides))


def test_bad_files_are_named(custom_roots, tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(custom_roots["gray"], root)
    with pytest.raises(DataError, match=r"data.custom.class_names: one class name per line"):
        options(root, **{"data.custom.class_names": "names.txt"})
    with pytest.raises(DataError, match=r"data.num_classes=4 but dataset 'custom' has 5 classes"):
        options(root, **{"data.num_classes": 4})
    with open(os.path.join(root, "three.txt"), "w") as f:
        f.write("a\nb\nc\n")
    with pytest.raises(DataError, match=r"palette.txt' has 6 colours; expected 3 lines 'R G B'"):
        options(root, **{"data.num_classes": 3, "data.custom.class_names": "three.txt",
                         "data.custom.palette": "palette.txt"})
    opts = options(root)
    with pytest.raises(DataError, match=r"data.split='missing.txt': list file .*missing.txt' does "
                                        r"not exist; data.name='custom' expects"):
        input_pipeline.train_plan(options(root, **{"data.split": "missing.txt"}))
    with open(os.path.join(root, "val.txt"), "a") as f:
        f.write("images/val/00000.jpg\n")
    with pytest.raises(DataError, match=r"val.txt names no mask for 1 image\(s\), the first "
                                        r"'images/val/00000.jpg'"):
        input_pipeline.create_val_dataset(opts, process_index=0, process_count=1)
