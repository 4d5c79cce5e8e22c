"""Your own dataset (`data.name='custom'`) with the Pascal recipe (MiT-B5, crop 513, 80 epochs, CE).

    python main.py --config configs/custom.py --workdir runs/mine --config.data.root=/data/mine \
        --config.data.num_classes=6

Under the data root (every path below may also be absolute, and each can be changed by its key):
  labeled.txt      `image mask` per line, paths relative to the root       (data.split)
  unlabeled.txt    `image` per line (a second field is ignored)           (data.unlabeled_split)
  val.txt          `image mask` per line                                  (data.val_split)
  class_names.txt  one class name per line, line k naming class k         (data.custom.class_names)
Masks are grayscale PNGs of class ids 0..num_classes-1 (or palette PNGs, decoded through
`data.custom.palette` or else the VOC colours); ignored pixels hold `data.custom.ignore_index`
(255). Evaluation runs on whole images (`eval.mode`; 'sliding_window' for large images) in the
smallest of `eval.buckets` that holds them: set the buckets to your largest validation image size.
`python -m allspark_jax.data.synthetic --layout custom --root DIR` writes a small dataset like this.
"""
from allspark_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "custom"
    config.data.root = None  # required: --config.data.root=/path/to/your/data
    config.data.split = "labeled.txt"
    config.data.unlabeled_split = "unlabeled.txt"
    config.data.val_split = "val.txt"
    config.data.custom.class_names = "class_names.txt"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.eval.mode = "original"
    return config
