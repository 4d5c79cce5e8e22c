"""The training / validation pipelines: contract, epochs, resumption, process sharding, TFDS, layouts."""
import itertools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from allspark_jax import config as config_lib
from allspark_jax import train_step
from allspark_jax.data import augment
from allspark_jax.data import datasets
from allspark_jax.data import input_pipeline
from allspark_jax.data import prepare
from allspark_jax.data import synthetic
from conftest import make_config, make_options

KEYS = ("image_l", "mask_l", "image_u_w", "image_u_s", "pad_u", "cutmix_u")
N_STEPS = 5  # 2 steps per epoch (9 unlabeled // 4): crosses two epoch boundaries


def _take(config, n=N_STEPS, **kw):
    return list(itertools.islice(input_pipeline.create_train_iterator(config, **kw), n))


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


@pytest.fixture(scope="module")
def fresh(data_synthetic_root):
    """The first N_STEPS global batches of one process, strong student view and CutMix on."""
    config = _config(data_synthetic_root)
    return _take(config, process_index=0, process_count=1)


def _config(root, seed=1, **overrides):
    data = {"name": "synthetic", "root": root, "split": "default", "num_classes": 5,
            "crop_size": 40, "batch_size": 4, "student_view": "strong", "cutmix_prob": 0.5}
    data.update(overrides)
    return make_options(seed, **data)


def test_contract_shapes_and_dtypes(fresh, data_config):
    b = fresh[0]
    assert b["image_l"].shape == (4, 40, 40, 3) and b["image_l"].dtype == np.float32
    assert b["mask_l"].shape == (4, 40, 40) and b["mask_l"].dtype == np.int32
    assert b["image_u_w"].shape == b["image_u_s"].shape == (4, 40, 40, 3)
    assert b["image_u_s"].dtype == np.float32
    assert b["pad_u"].dtype == b["cutmix_u"].dtype == bool and b["pad_u"].shape == (4, 40, 40)
    assert set(np.unique(b["mask_l"])) <= {0, 1, 2, 3, 4, 255}
    assert any(x["cutmix_u"].any() for x in fresh)
    assert not np.array_equal(b["image_u_w"], b["image_u_s"])
    assert input_pipeline.train_plan(data_config()).steps_per_epoch == 2
    assert data_config().class_names[0] == "background"
    off = _take(data_config(), 1, process_index=0, process_count=1)[0]
    np.testing.assert_array_equal(off["image_u_w"], off["image_u_s"])
    assert not off["cutmix_u"].any()


def test_batches_change_and_seed_matters(fresh, data_synthetic_root):
    assert not np.array_equal(fresh[0]["image_u_w"], fresh[1]["image_u_w"])
    other = _take(_config(data_synthetic_root), 1, process_index=0, process_count=1)
    assert _equal(other[0], fresh[0])  # same seed, same batch
    c = _config(data_synthetic_root, seed=2)
    assert not _equal(_take(c, 1, process_index=0, process_count=1)[0], fresh[0])


@pytest.mark.parametrize("start", [1, 3])
def test_resumption_reproduces_batches(fresh, data_synthetic_root, start):
    resumed = _take(_config(data_synthetic_root), N_STEPS - start, start_step=start,
                    process_index=0, process_count=1)
    for i, b in enumerate(resumed):
        assert _equal(b, fresh[start + i]), f"step {start + i}"


def test_two_processes_split_the_global_batch(fresh, data_synthetic_root):
    parts = [_take(_config(data_synthetic_root), 3, process_index=p, process_count=2) for p in (0, 1)]
    for t in range(3):
        assert parts[0][t]["image_l"].shape[0] == 2
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([parts[0][t][k], parts[1][t][k]]), fresh[t][k])


def test_tfds_source_gives_the_same_batches(fresh, data_synthetic_root, data_synthetic_tfds_dir):
    # synthetic needs its root for the split lists; the bytes come from the records
    config = _config(data_synthetic_root, source="tfds", tfds_data_dir=data_synthetic_tfds_dir)
    got = _take(config, 3, start_step=0, process_index=1, process_count=2)
    for t in range(3):
        for k in KEYS:
            np.testing.assert_array_equal(got[t][k], fresh[t][k][2:])
    assert input_pipeline.train_plan(config).steps_per_epoch == 2
    assert len(config.class_names) == 5


# ------------------------------------------------------------------ two strong views (UniMatch V2)

MEAN, STD = np.array(datasets.IMAGENET_MEAN), np.array(datasets.IMAGENET_STD)
TWO_VIEW_KEYS = ("image_l", "mask_l", "image_u_w", "image_u_s1", "image_u_s2", "pad_u", "cutmix_u1",
                 "cutmix_u2")


def _two_view_config(root, seed=1, **overrides):
    """`_config`'s data (strong view, CutMix 0.5) under method 'unimatch_v2' (its EMA teacher)."""
    data = {"name": "synthetic", "root": root, "split": "default", "num_classes": 5,
            "crop_size": 40, "batch_size": 4, "student_view": "strong", "cutmix_prob": 0.5}
    data.update(overrides)
    config = make_config(seed, **data)
    config.method, config.train.teacher = "unimatch_v2", "ema"
    return config_lib.data_options(config)


@pytest.fixture(scope="module")
def two_view(data_synthetic_root):
    """The first N_STEPS global batches of one process under 'unimatch_v2' (`fresh`'s seed)."""
    return _take(_two_view_config(data_synthetic_root), process_index=0, process_count=1)


def test_two_view_contract(two_view, fresh, data_synthetic_root):
    opts = _two_view_config(data_synthetic_root)
    assert opts.method.strong_views == 2
    assert set(two_view[0]) == set(TWO_VIEW_KEYS) == set(train_step.batch_keys(opts.method))
    for b in two_view:
        for k in ("image_l", "image_u_w", "image_u_s1", "image_u_s2"):
            assert b[k].shape == (4, 40, 40, 3) and b[k].dtype == np.float32, k
        assert b["mask_l"].shape == (4, 40, 40) and b["mask_l"].dtype == np.int32
        for k in ("pad_u", "cutmix_u1", "cutmix_u2"):
            assert b[k].shape == (4, 40, 40) and b[k].dtype == bool, k
    # one geometry and strong view 1 are the one-view pipeline's (`fresh`: same seed, same data)
    for b, f in zip(two_view, fresh):
        for k in ("image_l", "mask_l", "image_u_w", "pad_u"):
            np.testing.assert_array_equal(b[k], f[k])
        np.testing.assert_array_equal(b["image_u_s1"], f["image_u_s"])
        np.testing.assert_array_equal(b["cutmix_u1"], f["cutmix_u"])
    s1, s2, w = (np.concatenate([b[k] for b in two_view]) for k in ("image_u_s1", "image_u_s2",
                                                                      "image_u_w"))
    assert all(not np.array_equal(a, b) for a, b in zip(s1, s2))  # own photometric draws
    # a view skips jitter, grey and blur w.p. 0.08 (then it is the weak view)
    assert sum(not np.array_equal(a, b) for a, b in zip(s2, w)) >= 0.75 * len(w)
    assert sum(not np.array_equal(a, b) for a, b in zip(s1, w)) >= 0.75 * len(w)
    # view 2's geometry: padding is black in the weak crop, which every photometric op keeps one
    # grey colour; away from the image (blur reach), view 2 is that one grey on padding
    padded = 0
    for x, pad in zip(s2, np.concatenate([b["pad_u"] for b in two_view])):
        inner = pad.copy()
        r = augment.BLUR_RADIUS
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                inner &= np.roll(np.pad(pad, r, constant_values=True), (dy, dx), (0, 1))[r:-r, r:-r]
        if inner.any():
            padded += 1
            grey = x[inner] * STD + MEAN
            np.testing.assert_allclose(grey, np.broadcast_to(grey[0, 0], grey.shape), atol=1e-5)
    assert padded >= 3
    c1, c2 = (np.concatenate([b[k] for b in two_view]) for k in ("cutmix_u1", "cutmix_u2"))
    assert c1.any() and c2.any() and not np.array_equal(c1, c2)


def test_two_views_without_cutmix(data_synthetic_root):
    opts = _two_view_config(data_synthetic_root, cutmix_prob=0.0)
    b = _take(opts, 1, process_index=0, process_count=1)[0]
    keys = set(train_step.batch_keys(opts.method))
    assert keys == set(TWO_VIEW_KEYS) - {"cutmix_u1", "cutmix_u2"} and keys <= set(b)
    assert not b["cutmix_u1"].any() and not b["cutmix_u2"].any()


@pytest.mark.parametrize("start", [1, 3])
def test_two_views_resume(two_view, data_synthetic_root, start):
    resumed = _take(_two_view_config(data_synthetic_root), N_STEPS - start, start_step=start,
                    process_index=0, process_count=1)
    for i, b in enumerate(resumed):
        for k in TWO_VIEW_KEYS:
            np.testing.assert_array_equal(b[k], two_view[start + i][k],
                                          err_msg=f"{k}, step {start + i}")


def test_two_views_split_across_processes(two_view, data_synthetic_root):
    parts = [_take(_two_view_config(data_synthetic_root), 3, process_index=p, process_count=2)
             for p in (0, 1)]
    for t in range(3):
        for k in TWO_VIEW_KEYS:
            np.testing.assert_array_equal(np.concatenate([parts[0][t][k], parts[1][t][k]]),
                                          two_view[t][k])


def test_epoch_order_follows_the_release():
    num_l, num_u, batch = 3, 10, 4
    steps = num_u // batch
    seen_u = []
    for epoch in range(3):
        el = input_pipeline._epoch_positions(
            tf.constant(epoch, tf.int64), seed=0, num_labeled=num_l, num_unlabeled=num_u, steps=steps,
            batch=batch, local_batch=batch, process_index=0, start_epoch=0, start_offset=0)
        u, l = el["u"].numpy(), el["l"].numpy()
        assert len(u) == steps * batch and len(set(u)) == len(u)  # each unlabeled at most once
        # labeled list repeated ceil(10/3) = 4 times, truncated to 10: counts 4,3,3 minus the dropped 2
        counts = np.bincount(l, minlength=num_l)
        assert counts.sum() == 8 and counts.max() <= 4
        seen_u.append(tuple(u))
    assert len(set(seen_u)) == 3  # reshuffled each epoch


def test_validation_dataset_is_sharded(data_config, data_synthetic_tfds_dir):
    full = list(input_pipeline.create_val_dataset(data_config(), process_index=0, process_count=1)
                .as_numpy_iterator())
    assert [e["index"] for e in full] == [0, 1, 2, 3]
    assert full[0]["name"] == b"val_00000"
    e = full[1]
    assert e["image"].dtype == np.float32 and e["image"].shape[:2] == e["mask"].shape
    assert e["mask"].dtype == np.int32 and e["index"].dtype == np.int64
    shards = [list(input_pipeline.create_val_dataset(
        data_config(source="tfds", tfds_data_dir=data_synthetic_tfds_dir), process_index=p,
        process_count=3).as_numpy_iterator()) for p in range(3)]
    merged = sorted((int(x["index"]), x) for s in shards for x in s)
    assert [i for i, _ in merged] == [0, 1, 2, 3]
    for (i, x), y in zip(merged, full):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])


def test_prefetch_to_device(fresh):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = list(input_pipeline.prefetch_to_device(iter(fresh[:3]), sharding, size=2))
    assert len(out) == 3
    for got, want in zip(out, fresh):
        assert isinstance(got["image_l"], jax.Array) and got["image_l"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(got["mask_l"]), want["mask_l"])
    per_key = {k: sharding for k in KEYS}
    assert len(list(input_pipeline.prefetch_to_device(iter(fresh[:1]), per_key))) == 1


# ------------------------------------------------------------------ Cityscapes and COCO layouts


def _write_pair(root, image_rel, mask_rel, rng, num_classes, fmt):
    h, w = int(rng.integers(24, 40)), int(rng.integers(30, 50))
    os.makedirs(os.path.dirname(os.path.join(root, image_rel)), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(root, image_rel), format=fmt)
    if mask_rel:
        os.makedirs(os.path.dirname(os.path.join(root, mask_rel)), exist_ok=True)
        labels = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        labels[0] = 255
        Image.fromarray(labels, mode="L").save(os.path.join(root, mask_rel))


@pytest.fixture(scope="module")
def layout_roots(tmp_path_factory):
    """Tiny Cityscapes and COCO copies in their official layouts, with lists in <root>/splits/."""
    rng = np.random.default_rng(0)
    roots = {}
    # Cityscapes
    root = str(tmp_path_factory.mktemp("data_cityscapes"))
    lines = {"train": [], "val": []}
    for split, cities, n in (("train", ("aachen", "bochum"), 6), ("val", ("frankfurt",), 2)):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            img = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            msk = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
            _write_pair(root, img, msk, rng, 19, "PNG")
            lines[split].append(f"{img} {msk}\n")
    os.makedirs(os.path.join(root, "splits", "tiny"))
    open(os.path.join(root, "splits", "tiny", "labeled.txt"), "w").writelines(lines["train"][:2])
    open(os.path.join(root, "splits", "tiny", "unlabeled.txt"), "w").writelines(lines["train"][2:])
    open(os.path.join(root, "splits", "val.txt"), "w").writelines(lines["val"])
    roots["cityscapes"] = root
    # COCO: unlabeled = train2017 minus labeled (one unlabeled image has no mask)
    root = str(tmp_path_factory.mktemp("data_coco"))
    lines = {"train2017": [], "val2017": []}
    for split, n in (("train2017", 7), ("val2017", 2)):
        for i in range(n):
            stem = f"{i + (0 if split == 'train2017' else 100):012d}"
            msk = "" if (split, i) == ("train2017", 6) else f"masks/{stem}.png"
            _write_pair(root, f"{split}/{stem}.jpg", msk, rng, 81, "JPEG")
            lines[split].append(f"{split}/{stem}.jpg masks/{stem}.png\n")
    os.makedirs(os.path.join(root, "splits", "tiny"))
    open(os.path.join(root, "splits", "tiny", "labeled.txt"), "w").writelines(lines["train2017"][:2])
    open(os.path.join(root, "splits", "val.txt"), "w").writelines(lines["val2017"])
    roots["coco"] = root
    # Pascal: JPEG images and VOC-palette masks
    root = str(tmp_path_factory.mktemp("data_pascal"))
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    lines = []
    for i in range(8):
        image, labels = synthetic.render(i, "train", 40, 21, seed=5)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"2007_{i:06d}.jpg"))
        synthetic.save_palette_png(labels, os.path.join(root, "SegmentationClass", f"2007_{i:06d}.png"))
        lines.append(f"JPEGImages/2007_{i:06d}.jpg SegmentationClass/2007_{i:06d}.png\n")
    os.makedirs(os.path.join(root, "splits", "tiny"))
    open(os.path.join(root, "splits", "tiny", "labeled.txt"), "w").writelines(lines[:2])
    open(os.path.join(root, "splits", "tiny", "unlabeled.txt"), "w").writelines(lines[2:6])
    open(os.path.join(root, "splits", "val.txt"), "w").writelines(lines[6:])
    roots["pascal"] = root
    return roots


@pytest.mark.parametrize("name", ["pascal", "cityscapes", "coco"])
def test_official_layouts_files_and_tfds(name, layout_roots, tmp_path):
    root = layout_roots[name]
    common = {"name": name, "split": os.path.join(root, "splits", "tiny", "labeled.txt"),
              "val_split": os.path.join(root, "splits", "val.txt"), "crop_size": 32,
              "num_classes": {"pascal": 21, "cityscapes": 19, "coco": 81}[name],
              "batch_size": 2, "student_view": "strong"}
    files = make_options(0, **common, root=root)
    assert input_pipeline.train_plan(files).steps_per_epoch == 2  # 4 or 5 unlabeled // 2
    data_dir = prepare.prepare(name, root, str(tmp_path))
    tfds_cfg = make_options(0, **common, source="tfds", tfds_data_dir=str(tmp_path))
    assert os.path.isdir(data_dir)
    a = _take(files, 3, process_index=0, process_count=1)
    b = _take(tfds_cfg, 3, process_index=0, process_count=1)
    for x, y in zip(a, b):
        assert _equal(x, y)
        num_classes = {"pascal": 21, "cityscapes": 19, "coco": 81}[name]
        assert x["mask_l"][x["mask_l"] != 255].max() < num_classes
    va = list(input_pipeline.create_val_dataset(files, process_index=0, process_count=1)
              .as_numpy_iterator())
    vb = list(input_pipeline.create_val_dataset(tfds_cfg, process_index=0, process_count=1)
              .as_numpy_iterator())
    assert len(va) == len(vb) == 2
    for x, y in zip(va, vb):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
        assert x["name"] == y["name"]
    assert len(files.class_names) == {"pascal": 21, "cityscapes": 19, "coco": 81}[name]
