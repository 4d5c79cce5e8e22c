"""Turns a data root in the official layout into TFDS ArrayRecord records, once.

    python -m allspark_jax.data.prepare --name pascal --root /data/pascal [--data_dir DIR]

equivalent to `tfds build --imports allspark_jax.data.tfds_builders allspark_pascal --manual_dir ROOT
--data_dir DIR --file_format array_record`. Training then reads the records with
`data.source='tfds'`, `data.tfds_data_dir=DIR` (each process reading only its own examples).
"""
from __future__ import annotations

import argparse
import os

import tensorflow_datasets as tfds

from allspark_jax.data import datasets
from allspark_jax.data import tfds_builders


def prepare(name: str, root: str, data_dir: str | None = None) -> str:
    """Builds the records of dataset `name` from data root `root`; returns the dataset's folder."""
    root = datasets.check_root(root, "--root")
    builder = tfds_builders.builder(name, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    return os.fspath(builder.data_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, choices=sorted(tfds_builders.BUILDERS))
    parser.add_argument("--root", required=True, help="data root in the official layout")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    args = parser.parse_args(argv)
    print(f"prepared {prepare(args.name, args.root, args.data_dir)}")


if __name__ == "__main__":
    main()
