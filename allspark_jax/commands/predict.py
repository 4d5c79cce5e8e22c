"""`main.py --mode predict`: images (files or folders) in, palette PNG masks and overlays out.

For every input image `<name>.<ext>` the output directory receives
  <name>.png          the predicted labels as a palette PNG (VOC palette for Pascal / COCO /
                      synthetic, the Cityscapes palette for Cityscapes, data.custom.palette (or
                      VOC's) for a custom dataset; pixel values are class ids)
  <name>_overlay.jpg  the image blended with the colour mask (alpha `OVERLAY_ALPHA`)
Images are normalised as in validation and predicted with `config.eval.mode` (center_crop predicts
the central crop, so its outputs are crop-sized).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from allspark_jax import checkpoints
from allspark_jax import config as config_lib
from allspark_jax import runtime
from allspark_jax.data import datasets
from allspark_jax.errors import DataError
from allspark_jax.evaluation import bucketing
from allspark_jax.evaluation import evaluator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OVERLAY_ALPHA = 0.5


def list_images(inputs) -> list[str]:
    """Image files named by `inputs` (files and/or folders, searched non-recursively, sorted)."""
    if isinstance(inputs, str):
        inputs = [p for p in inputs.split(",") if p]
    files = []
    for p in inputs:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--inputs: {p!r} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"--inputs={inputs!r}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: str, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, normalised float32 image) as the validation pipeline normalises.

    Raises DataError naming `path` when the file is not a readable image (corrupt, truncated, or
    another format), or when its header declares more than `max_pixels` pixels (checked before
    decoding; None: no bound).
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise DataError(
                    f"image {path!r} too large: its header declares {height} x {width} pixels; "
                    f"expected at most {max_pixels} (data.max_image_pixels)")
            rgb = np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        # PIL's format plugins report corrupt data with many types (OSError, SyntaxError,
        # ValueError, struct.error, EOFError, DecompressionBombError, ...).
        raise DataError(f"cannot read image {path!r} ({type(e).__name__}: {e}); expected "
                        f"an intact image file ({', '.join(IMAGE_EXTENSIONS)})") from None
    return rgb, normalize(rgb)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> ImageNet-normalised float32, as the validation pipeline normalises."""
    mean = np.asarray(datasets.IMAGENET_MEAN, np.float32)
    std = np.asarray(datasets.IMAGENET_STD, np.float32)
    return (rgb.astype(np.float32) / 255.0 - mean) / std


def save_outputs(rgb: np.ndarray, pred: np.ndarray, pal: np.ndarray, out_dir: str, name: str):
    """Writes <out_dir>/<name>.png (palette mask of `pred`) and <name>_overlay.jpg; their paths."""
    mask = Image.fromarray(pred.astype(np.uint8), mode="P")
    mask.putpalette(pal.reshape(-1).tolist())
    mask_path = os.path.join(out_dir, name + ".png")
    mask.save(mask_path)
    colour = pal[pred.astype(np.int64)]
    blend = (rgb.astype(np.float32) * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA)
    overlay_path = os.path.join(out_dir, name + "_overlay.jpg")
    Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)).save(overlay_path, quality=90)
    return mask_path, overlay_path


def run_predict(config, workdir: str | None, spec, inputs, output_dir: str, *,
                quiet: bool = False) -> list[dict]:
    """Predicts every input image with the checkpoint `spec`; returns one record per image.

    Images run in the bucketed programs of `config.eval` (`evaluation.predictor`), several per call.
    `quiet`: print nothing (the default prints one line per image and a summary).
    """
    files = list_images(inputs)
    if workdir:  # without one (a weight file's predictions) there is no <workdir>/jax_cache
        runtime.setup_compilation_cache(config, workdir)
    variables, info = checkpoints.load_inference_variables(config, workdir, spec)
    predictor = evaluator.make_predictor(config, info["model"])
    # A custom dataset's palette file lives under its root: resolve the data options for it.
    opts = config_lib.data_options(config, workdir) if config.data.name == "custom" else None
    pal = datasets.palette(config.data.name, opts)
    os.makedirs(output_dir, exist_ok=True)

    def images():
        for i, path in enumerate(files):
            rgb, image = load_image(path, int(config.data.max_image_pixels))
            image, _ = predictor.prepare(image)
            yield (i, path, rgb), image

    records = []  # (input index, record): the stream finishes images out of order
    for (i, path, rgb), pred in predictor.predict_stream(variables["student"], images()):
        if predictor.mode == "center_crop":
            rgb = bucketing.center_crop(rgb, predictor.crop)
        name = os.path.splitext(os.path.basename(path))[0]
        mask_path, overlay_path = save_outputs(rgb, pred, pal, output_dir, name)
        records.append((i, {"image": path, "mask": mask_path, "overlay": overlay_path,
                            "classes": sorted(int(c) for c in np.unique(pred))}))
        if not quiet:
            print(f"{path} -> {mask_path}, {overlay_path}", flush=True)
    if not quiet:
        print(f"predicted {len(files)} image(s) with checkpoint {info['checkpoint']} "
              f"(step {info['step']}) into {output_dir}", flush=True)
    return [record for _, record in sorted(records, key=lambda r: r[0])]
