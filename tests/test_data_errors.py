"""Bad input: each error names the file or option and what was expected."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from allspark_jax.data import datasets
from allspark_jax.data import input_pipeline
from allspark_jax.data import prepare
from conftest import make_options

DataError = datasets.DataError


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
