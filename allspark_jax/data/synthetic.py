"""A small synthetic segmentation dataset in the Pascal layout, learnable from shape, texture and colour.

    python -m allspark_jax.data.synthetic --root DIR --num_train N --num_val M --size S --num_classes K

writes under DIR:
  JPEGImages/{train,val}_NNNNN.jpg           RGB JPEG, height and width each in [0.75 S, S]
  SegmentationClass/{train,val}_NNNNN.png    palette PNG (VOC palette), labels 0..K-1, 255 borders
  splits/default/labeled.txt                 the first `num_labeled` training images
  splits/default/unlabeled.txt               the other training images
  splits/val.txt                             the validation images
  class_names.txt                            K names, background first
Each list line is `JPEGImages/x.jpg SegmentationClass/x.png` (the official format).

With `--layout custom` it writes the same images as a custom dataset (`data.name='custom'`):
  images/{train,val}/NNNNN.jpg, masks/{train,val}/NNNNN.png   grayscale PNG labels (with
                                             `--palette_masks`, palette PNGs in palette.txt's colours)
                                             whose ignored pixels hold `--ignore_index`
  labeled.txt, val.txt                       `images/... masks/...` lines
  unlabeled.txt                              `images/...` lines (the image alone)
  class_names.txt                            K names, background first
  palette.txt                                K `R G B` lines, then the ignore colour

Class 0 is a noisy, smoothly shaded background; class k >= 1 is an object whose shape (disc, square,
triangle, diamond), stripe texture (period and orientation) and colour are fixed per class. Objects
have a 255 ("ignore") border as in VOC. The output is a deterministic function of the arguments.
Use it with `data.name='synthetic'`, `data.root=DIR`, `data.split='default'` (custom layout:
configs/custom.py with `data.root=DIR`).

The style (`Style`; `--colours`, `--max_objects`, `--distractors`, `--hue_jitter`; the config's
`data.synthetic.*` keys of the same names) makes the task harder; its defaults are the original
task, rendered bit for bit as before the style existed (its draws come from a second generator):
  colours      N > 0: N object hues, classes N apart sharing one (told apart by shape / stripes)
  max_objects  objects per image drawn in [1, max_objects] (3); later ones occlude earlier ones
  distractors  up to this many unstriped shapes of random hue per image, drawn last (occluding
               the objects) and labelled background: clutter
  hue_jitter   per image, every object's hue shifted by one draw in [-hue_jitter, hue_jitter]
`configs/learning.py:regime` uses them: 7 classes, up to 4 objects, hue shifts of up
to 0.05, 10 of 290 training images labeled.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import inspect
import json
import os

import numpy as np
from etils import epath
from PIL import Image

from allspark_jax.data import datasets
from allspark_jax.errors import DataError

SHAPES = ("disc", "square", "triangle", "diamond")
LAYOUTS = ("pascal", "custom")
BACKGROUND_COLOUR = (96, 96, 96)  # palette.txt's colour of class 0
IGNORE_COLOUR = (255, 255, 255)  # palette.txt's last line: ignored pixels


def _colour(hue: float) -> np.ndarray:
    """An object's RGB (0..255) for `hue` (a fraction of the circle) at the classes' saturation
    and value."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.85, 0.95)) * 255


def class_style(k: int, num_classes: int, colours: int = 0) -> dict:
    """Shape, colour (RGB 0..255) and its hue (0..1), stripe period and orientation of object class
    k >= 1. `colours` 0: one hue per class, spread over the circle; > 0: that many hues, class k
    taking hue (k - 1) % colours, so classes `colours` apart share their colour and differ by shape
    and/or stripes."""
    n = max(num_classes - 1, 1)
    hue = ((k - 1) / n) % 1.0 if not colours else ((k - 1) % colours) / colours
    return {"shape": SHAPES[(k - 1) % len(SHAPES)], "colour": _colour(hue), "hue": hue,
            "period": 3 + (k - 1) % 5, "angle": np.pi * ((k - 1) % 3) / 3}


def class_names(num_classes: int) -> list[str]:
    names = ["background"]
    for k in range(1, num_classes):
        names.append(f"{class_style(k, num_classes)['shape']}_{k}")
    return names


def _shape_mask(shape, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    # triangle pointing up: inside if below the two slanted edges and above the base
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


@dataclasses.dataclass(frozen=True)
class Style:
    """The rendering knobs beyond sizes and counts; the defaults are the original task's.

    colours: object hues (`class_style`): 0 one per class; > 0 that many, shared by the classes
      `colours` apart, which then differ only by shape and/or stripes.
    max_objects: objects per image, drawn uniformly in [1, max_objects]; later ones cover (occlude)
      earlier ones.
    distractors: clutter per image, drawn uniformly in [0, distractors] after the objects (so they
      occlude them): unstriped shapes of any hue, labelled background.
    hue_jitter: per image, every object's hue shifts by one draw from [-hue_jitter, hue_jitter]
      (a fraction of the hue circle): a class's colour varies from image to image.
    """
    colours: int = 0
    max_objects: int = 3
    distractors: int = 0
    hue_jitter: float = 0.0

    def check(self) -> None:
        """Raises ValueError naming the first knob outside its range."""
        for name, value, lo in (("colours", self.colours, 0), ("max_objects", self.max_objects, 1),
                                ("distractors", self.distractors, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
                raise ValueError(f"--{name}={value!r}: expected an integer >= {lo}.")
        if not 0.0 <= float(self.hue_jitter) <= 0.5:
            raise ValueError(f"--hue_jitter={self.hue_jitter!r}: expected a fraction of the hue "
                             "circle in [0, 0.5].")


def render(index: int, split: str, size: int, num_classes: int, seed: int,
           style: Style = Style()) -> tuple[np.ndarray, np.ndarray]:
    """Renders one example: ((h, w, 3) uint8 image, (h, w) uint8 labels with 255 borders).

    The original task's draws (`Style()`) come from one generator; what the other knobs add (hue
    shift, clutter) from a second one, so the default output is unchanged by their existence.
    """
    split_id = 0 if split == "train" else 1
    rng = np.random.default_rng([seed, split_id, index])
    extra = np.random.default_rng([seed, split_id, index, 1])
    shift = extra.uniform(-style.hue_jitter, style.hue_jitter) if style.hue_jitter else 0.0
    h = int(rng.integers(int(size * 0.75), size + 1))
    w = int(rng.integers(int(size * 0.75), size + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 160, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    img = (base + (yy / h)[..., None] * grad[0] + (xx / w)[..., None] * grad[1]
           + rng.normal(0, 12, size=(h, w, 3)))
    labels = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, style.max_objects + 1))):
        k = int(rng.integers(1, num_classes)) if num_classes > 1 else 0
        if k == 0:
            break
        st = class_style(k, num_classes, style.colours)
        colour = _colour(st["hue"] + shift) if shift else st["colour"]
        r = rng.uniform(size / 8, size / 4)
        cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
        inside = _shape_mask(st["shape"], yy, xx, cy, cx, r)
        proj = xx * np.cos(st["angle"]) + yy * np.sin(st["angle"])
        stripes = (np.floor(proj / st["period"]) % 2)[..., None]
        tex = colour * (0.7 + 0.3 * stripes) + rng.normal(0, 8, size=(h, w, 3))
        img = np.where(inside[..., None], tex, img)
        labels[inside] = k
    for _ in range(int(extra.integers(0, style.distractors + 1)) if style.distractors else 0):
        shape = SHAPES[int(extra.integers(len(SHAPES)))]
        r = extra.uniform(size / 8, size / 4)
        cy, cx = extra.uniform(r * 0.5, h - r * 0.5), extra.uniform(r * 0.5, w - r * 0.5)
        inside = _shape_mask(shape, yy, xx, cy, cx, r)
        flat = _colour(extra.uniform()) * 0.85 + extra.normal(0, 8, size=(h, w, 3))
        img = np.where(inside[..., None], flat, img)
        labels[inside] = 0
    # VOC-style ignore border: pixels whose 4-neighbourhood holds another label.
    p = np.pad(labels, 1, mode="edge")
    edge = ((p[1:-1, 1:-1] != p[:-2, 1:-1]) | (p[1:-1, 1:-1] != p[2:, 1:-1])
            | (p[1:-1, 1:-1] != p[1:-1, :-2]) | (p[1:-1, 1:-1] != p[1:-1, 2:]))
    labels = np.where(edge, np.uint8(255), labels)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def save_palette_png(labels: np.ndarray, path, palette: np.ndarray | None = None) -> None:
    """Writes (h, w) uint8 labels as a palette PNG with `palette` ((256, 3) uint8, default VOC's)."""
    im = Image.fromarray(labels, mode="P")
    im.putpalette((datasets.voc_palette() if palette is None else palette).reshape(-1).tolist())
    with epath.Path(path).open("wb") as f:
        im.save(f, format="PNG")


def custom_palette(num_classes: int, colours: int = 0) -> list[tuple[int, int, int]]:
    """palette.txt's colours: class k's (the background grey, each object its colour with
    `class_style`'s `colours`), then the ignore colour."""
    out = [BACKGROUND_COLOUR]
    out += [tuple(int(round(c)) for c in class_style(k, num_classes, colours)["colour"])
                for k in range(1, num_classes)]
    return out + [IGNORE_COLOUR]


def _write_custom(out, stems, examples, num_labeled, num_classes, ignore_index, palette_masks,
                  jpeg_quality, style):
    """The custom layout (module docstring) of rendered `examples` {split: [(image, labels)]}."""
    colours = custom_palette(num_classes, style.colours)
    pal = datasets.palette_array(colours, num_classes, ignore_index)
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "val": []}
    for split, items in examples.items():
        for stem, (image, labels) in zip(stems[split], items):
            labels = np.where(labels == datasets.IGNORE_INDEX, np.uint8(ignore_index), labels)
            with (out / "images" / split / f"{stem}.jpg").open("wb") as f:
                Image.fromarray(image).save(f, format="JPEG", quality=jpeg_quality)
            mask_path = out / "masks" / split / f"{stem}.png"
            if palette_masks:
                save_palette_png(labels, mask_path, pal)
            else:
                with mask_path.open("wb") as f:
                    Image.fromarray(labels, mode="L").save(f, format="PNG")
            lines[split].append((f"images/{split}/{stem}.jpg", f"masks/{split}/{stem}.png"))
    paths = {"labeled": "labeled.txt", "unlabeled": "unlabeled.txt", "val": "val.txt"}
    (out / "labeled.txt").write_text("".join(f"{i} {m}\n" for i, m in lines["train"][:num_labeled]))
    (out / "unlabeled.txt").write_text("".join(f"{i}\n" for i, _ in lines["train"][num_labeled:]))
    (out / "val.txt").write_text("".join(f"{i} {m}\n" for i, m in lines["val"]))
    (out / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in colours))
    return {k: os.path.join(os.fspath(out), v) for k, v in paths.items()}


def write_dataset(root: str, num_train: int, num_val: int, size: int, num_classes: int,
                  seed: int = 0, num_labeled: int | None = None, jpeg_quality: int = 90,
                  layout: str = "pascal", ignore_index: int = datasets.IGNORE_INDEX,
                  palette_masks: bool = False, style: Style = Style()) -> dict:
    """Writes the dataset (see the module docstring); returns {'labeled', 'unlabeled', 'val'} list paths.

    `ignore_index` and `palette_masks` shape the custom layout only (the Pascal one is VOC's);
    `style` the images (`Style`).
    """
    if num_classes < 2 or num_classes > 255:
        raise ValueError(f"--num_classes={num_classes}: expected 2..255 (background + object classes).")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout={layout!r}: expected one of {', '.join(LAYOUTS)}.")
    if layout == "custom" and not num_classes <= ignore_index <= 255:
        raise ValueError(f"--ignore_index={ignore_index}: expected a mask value no class uses "
                         f"({num_classes}..255).")
    if num_train < 2:
        raise ValueError(f"--num_train={num_train}: expected >= 2 (labeled and unlabeled images).")
    num_labeled = num_labeled if num_labeled is not None else max(1, num_train // 4)
    if not 1 <= num_labeled < num_train:
        raise ValueError(f"--num_labeled={num_labeled}: expected 1 <= num_labeled < num_train.")
    style.check()
    out = epath.Path(root)
    if layout == "custom":
        stems = {"train": [f"{i:05d}" for i in range(num_train)],
                 "val": [f"{i:05d}" for i in range(num_val)]}
        examples = {split: [render(i, split, size, num_classes, seed, style)
                              for i in range(len(names))]
                    for split, names in stems.items()}
        paths = _write_custom(out, stems, examples, num_labeled, num_classes, ignore_index,
                              palette_masks, jpeg_quality, style)
        (out / "class_names.txt").write_text("\n".join(class_names(num_classes)) + "\n")
        return paths
    for folder in ("JPEGImages", "SegmentationClass", "splits/default"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "val": []}
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            image, labels = render(i, split, size, num_classes, seed, style)
            stem = f"{split}_{i:05d}"
            with (out / "JPEGImages" / f"{stem}.jpg").open("wb") as f:
                Image.fromarray(image).save(f, format="JPEG", quality=jpeg_quality)
            save_palette_png(labels, out / "SegmentationClass" / f"{stem}.png")
            lines[split].append(f"JPEGImages/{stem}.jpg SegmentationClass/{stem}.png\n")
    paths = {"labeled": os.path.join(root, "splits", "default", "labeled.txt"),
             "unlabeled": os.path.join(root, "splits", "default", "unlabeled.txt"),
             "val": os.path.join(root, "splits", "val.txt")}
    for key, subset in (("labeled", lines["train"][:num_labeled]),
                        ("unlabeled", lines["train"][num_labeled:]), ("val", lines["val"])):
        epath.Path(paths[key]).write_text("".join(subset))
    # Written last: its presence marks a complete dataset (`ensure_dataset`).
    (out / "class_names.txt").write_text("\n".join(class_names(num_classes)) + "\n")
    return paths


SETTINGS_FILE = "synthetic.json"  # the settings a dataset was written with (`ensure_dataset`)


def _settings(**spec) -> dict:
    """`write_dataset`'s arguments (but the root) with their defaults, the style's knobs among
    them, as JSON values."""
    bound = inspect.signature(write_dataset).bind("", **spec)
    bound.apply_defaults()
    out = dict(bound.arguments)
    del out["root"]
    style = dataclasses.asdict(out.pop("style"))
    return {**out, **style}


def ensure_dataset(root: str, **spec) -> bool:
    """Writes the dataset `spec` (the arguments of `write_dataset`) into `root` unless it is there.

    The settings go to `SETTINGS_FILE` and the class-name file is written last, so its presence
    means a complete dataset. A dataset there written with other settings is not reused: DataError
    names the first setting that differs. Returns whether anything was written.
    """
    want = _settings(**spec)
    settings = epath.Path(root, SETTINGS_FILE)
    if epath.Path(root, "class_names.txt").is_file():
        have = json.loads(settings.read_text()) if settings.is_file() else want
        for key in want:
            if have.get(key) != want[key]:
                raise DataError(
                    f"{settings}: this synthetic dataset was written with {key}={have.get(key)!r}, "
                    f"not the {want[key]!r} asked for (config.data.synthetic); remove {root} or "
                    "write the dataset into another data.root")
        return False
    epath.Path(root).mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(want, indent=1, sort_keys=True))
    write_dataset(root, **spec)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output data root")
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--num_val", type=int, default=16)
    parser.add_argument("--num_labeled", type=int, default=None, help="default num_train // 4")
    parser.add_argument("--size", type=int, default=64, help="largest image side")
    parser.add_argument("--num_classes", type=int, default=5, help="including background")
    parser.add_argument("--seed", type=int, default=0)
    defaults = Style()
    parser.add_argument("--colours", type=int, default=defaults.colours,
                        help="object hues shared by the classes (0: one per class)")
    parser.add_argument("--max_objects", type=int, default=defaults.max_objects,
                        help="objects per image at most (later ones occlude earlier ones)")
    parser.add_argument("--distractors", type=int, default=defaults.distractors,
                        help="unstriped clutter shapes (background) per image at most")
    parser.add_argument("--hue_jitter", type=float, default=defaults.hue_jitter,
                        help="per-image hue shift of the objects, at most (fraction of the circle)")
    parser.add_argument("--layout", default="pascal", choices=LAYOUTS,
                        help="pascal (data.name='synthetic') or custom (data.name='custom')")
    parser.add_argument("--ignore_index", type=int, default=datasets.IGNORE_INDEX,
                        help="custom layout: mask value of ignored pixels")
    parser.add_argument("--palette_masks", action="store_true",
                        help="custom layout: palette PNG masks in palette.txt's colours")
    args = parser.parse_args(argv)
    paths = write_dataset(args.root, args.num_train, args.num_val, args.size, args.num_classes,
                          args.seed, args.num_labeled, layout=args.layout,
                          ignore_index=args.ignore_index, palette_masks=args.palette_masks,
                          style=Style(colours=args.colours, max_objects=args.max_objects,
                                      distractors=args.distractors, hue_jitter=args.hue_jitter))
    print(f"wrote {args.num_train} train + {args.num_val} val images to {args.root}; lists: {paths}")


if __name__ == "__main__":
    main()
