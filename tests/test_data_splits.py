"""Split resolution, class names and the synthetic writer."""
import os

import numpy as np
import pytest
from PIL import Image

from allspark_jax import errors
from allspark_jax.data import datasets
from allspark_jax.data import splits
from allspark_jax.data import synthetic
from conftest import make_options


@pytest.mark.parametrize("name,split,n_l,n_u", [
    ("pascal", "92", 92, 10490), ("pascal", "1464", 1464, 9118), ("pascal", "1_16", 662, 9920),
    ("pascal", "u2pl_1_8", 1323, 9259), ("cityscapes", "1_30", 100, 2875),
    ("cityscapes", "1_2", 1488, 1487)])
def test_official_splits(name, split, n_l, n_u):
    s = splits.resolve_train_split(name, split)
    # The shipped files may lack a final newline: allow the count to be one lower.
    assert len(s.labeled) in (n_l, n_l - 1) and len(s.unlabeled) in (n_u, n_u - 1)
    assert not {p for p, _ in s.labeled} & {p for p, _ in s.unlabeled}
    assert all(m for _, m in s.labeled)


def test_available_and_val_splits():
    assert set(splits.available_splits("pascal")) >= {
        "92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2", "u2pl_1_16", "u2pl_1_8",
        "u2pl_1_4"}
    assert set(splits.available_splits("cityscapes")) == {"1_30", "1_16", "1_8", "1_4", "1_2"}
    assert set(splits.available_splits("coco")) == {"1_512", "1_256", "1_128", "1_64", "1_32"}
    assert len(splits.resolve_val_split("pascal", "val")[0]) == 1449
    assert len(splits.resolve_val_split("cityscapes")[0]) in (499, 500)
    assert len(splits.resolve_val_split("coco")[0]) in (4999, 5000)


def test_unknown_split_names_options():
    with pytest.raises(errors.DataError, match=r"data.split='1_3'.*1_16"):
        splits.resolve_train_split("pascal", "1_3")
    with pytest.raises(errors.DataError, match="data.val_split='test'"):
        splits.resolve_val_split("pascal", "test")
    with pytest.raises(errors.DataError, match="data.name='voc'"):
        splits.resolve_train_split("voc", "1_16")
    with pytest.raises(errors.DataError, match="list file does not exist"):
        splits.resolve_train_split("pascal", "/nonexistent/labeled.txt")


def test_user_list_files(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg a.png\n\nb.jpg b.png\n")
    (tmp_path / "u.txt").write_text("c.jpg c.png\n")
    s = splits.resolve_train_split("pascal", str(tmp_path / "l.txt"), str(tmp_path / "u.txt"))
    assert s.labeled == [("a.jpg", "a.png"), ("b.jpg", "b.png")]
    assert s.unlabeled == [("c.jpg", "c.png")]
    (tmp_path / "unlabeled.txt").write_text("d.jpg d.png\n")
    assert splits.resolve_train_split("pascal", str(tmp_path / "l.txt")).unlabeled == [
        ("d.jpg", "d.png")]
    (tmp_path / "bad.txt").write_text("a.jpg a.png extra\n")
    with pytest.raises(errors.DataError, match=r"bad.txt:1: expected 'image_path mask_path'"):
        splits.read_list(str(tmp_path / "bad.txt"))


def test_labeled_only_reads_no_unlabeled_list(tmp_path):
    """config.method 'supervised': no unlabeled list is looked for, read or listed."""
    (tmp_path / "l.txt").write_text("a.jpg a.png\n")
    with pytest.raises(errors.DataError, match=r"no unlabeled list for data.split="):
        splits.resolve_train_split("pascal", str(tmp_path / "l.txt"))
    s = splits.resolve_train_split("pascal", str(tmp_path / "l.txt"), labeled_only=True)
    assert (s.labeled, s.unlabeled, s.unlabeled_source) == ([("a.jpg", "a.png")], [], "")
    # COCO's unlabeled set is a listing of the root's train2017/: not needed either
    s = splits.resolve_train_split("coco", "1_512", root=str(tmp_path), labeled_only=True)
    assert len(s.labeled) in (231, 232) and s.unlabeled == []


def test_coco_unlabeled_is_train2017_minus_labeled(tmp_path):
    (tmp_path / "train2017").mkdir()
    for i in range(5):
        (tmp_path / "train2017" / f"{i:012d}.jpg").write_bytes(b"x")
    s = splits.resolve_train_split("coco", "1_512", root=str(tmp_path))
    assert len(s.labeled) in (231, 232)
    assert [p for p, _ in s.unlabeled] == [f"train2017/{i:012d}.jpg" for i in range(5)]
    assert s.unlabeled[0][1] == "masks/000000000000.png"
    lab = tmp_path / "lab.txt"
    lab.write_text("train2017/000000000001.jpg masks/000000000001.png\n")
    s = splits.resolve_train_split("coco", str(lab), root=str(tmp_path))
    assert len(s.unlabeled) == 4 and "train2017/000000000001.jpg" not in dict(s.unlabeled)
    with pytest.raises(errors.DataError, match="train2017"):
        splits.resolve_train_split("coco", "1_512", root=str(tmp_path / "train2017"))


def test_class_names(tmp_path):
    assert len(datasets.class_names_for("pascal")) == 21
    assert len(datasets.class_names_for("cityscapes")) == 19
    names = datasets.class_names_for("coco")
    assert len(names) == 81 and names[0] == "background" and len(set(names)) == 81
    with pytest.raises(errors.DataError, match="data.num_classes=20"):
        make_options(name="pascal", root=str(tmp_path), num_classes=20)


def test_voc_palette():
    pal = datasets.voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in pal}) == 256


def test_synthetic_writer(data_synthetic_root, tmp_path):
    root = data_synthetic_root
    lab = splits.read_list(os.path.join(root, "splits", "default", "labeled.txt"))
    unl = splits.read_list(os.path.join(root, "splits", "default", "unlabeled.txt"))
    val = splits.read_list(os.path.join(root, "splits", "val.txt"))
    assert (len(lab), len(unl), len(val)) == (3, 9, 4)
    sizes, labels = set(), set()
    for image, mask in lab + unl + val:
        im = Image.open(os.path.join(root, image))
        m = Image.open(os.path.join(root, mask))
        assert im.format == "JPEG" and m.mode == "P" and im.size == m.size
        assert m.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        sizes.add(im.size)
        labels |= set(np.unique(np.asarray(m)).tolist())
    assert len(sizes) > 3 and any(w != h for w, h in sizes)
    assert 255 in labels and 0 in labels and max(labels - {255}) <= 4
    assert datasets.synthetic_class_names(root)[0] == "background"
    # deterministic
    a, b = synthetic.render(3, "train", 48, 5, 0), synthetic.render(3, "train", 48, 5, 0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    synthetic.main(["--root", str(tmp_path), "--num_train", "4", "--num_val", "1", "--size", "32",
                    "--num_classes", "3"])
    assert (tmp_path / "splits" / "val.txt").read_text().startswith(
        "JPEGImages/val_00000.jpg SegmentationClass/val_00000.png")
