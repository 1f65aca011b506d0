"""The rows a digits training job reads: the example images plus logged traffic images joined with their labels.

    <data>/digits/*.parquet     example data (`python -m training.datasets digits`: "image" 8 x 8 uint8
                                lists, "label", "split"); written (seed 0) when the folder holds none
    <data>/traffic/<served model>/version=<v>/date=<d>/*.parquet   the prediction log: only files whose
                                images were logged in full (`fleet.log.inputs: full`) can train
    <data>/labels/<served model>/date=<d>/*.parquet                their labels (training.traffic joins them)

Every image, of whatever size, becomes what the server hands the model
(`training.digits.normalize_digits`: resized to 8 x 8, normalised), grouped by
size so each group is one call. Splits: an example row keeps its file's
"split" ("holdout" rows are the holdout, the seeded split the bootstrap version
was trained without, so the gate compares on rows neither saw); the other rows,
and every traffic row, go by the hash of their normalised pixels
(`training.data.split_buckets`): buckets 0-19 holdout (traffic only), 20-29
validation, the rest train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serving.storage import list_files, locate, write_whole
from training.data import HOLDOUT_PERCENT, VALIDATION_PERCENT, DataSources, SplitRows, check_example_files, split_buckets
from training.datasets import write_digits_parquet
from training.digits import DIGITS_SIZE, normalize_digits
from training.traffic import DEFAULT_LABEL_WINDOW_DAYS, LabelledTraffic, decode_images, image_columns, \
    read_labelled_traffic

__all__ = ["DIGITS_INPUT", "DigitsSplit", "DigitsRows", "digits_example_files", "read_example_digits",
           "digits_traffic", "split_digits", "digits_rows", "to_ray_dataset"]

DIGITS_INPUT = "image"  # the digits config's input: the log's "image", "image_shape" columns
_CLASSES = 10


# One split's rows: normalised images float32 [n, 1, 8, 8], labels int64 [n], from traffic bool [n] (fraud's
# split type, images in place of the features).
DigitsSplit = SplitRows


@dataclass
class DigitsRows:
    """What a digits job trains and judges on, and where it came from."""

    sources: DataSources
    train: DigitsSplit
    validation: DigitsSplit
    holdout: DigitsSplit
    traffic_report: dict = field(default_factory=dict)


def digits_example_files(root: str | Path, seed: int = 0) -> tuple[str, ...]:
    """The example parquet files under `root/digits/` (paths in root's filesystem), the seeded one written first
    when there is none."""
    location = locate(str(root))
    folder = location.sub("digits")
    files = tuple(p for p in list_files(location.fs, folder) if "/" not in p[len(folder) + 1:])  # not in sub-folders
    if not files:
        path = location.sub("digits", f"digits-seed{seed}.parquet")
        # A concurrent job sees the whole file or none.
        write_whole(location.fs, path, lambda target: write_digits_parquet(target, seed=seed, filesystem=location.fs))
        files = (path,)
    return files


def read_example_digits(files: tuple[str, ...], filesystem: pafs.FileSystem | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised images float32 [n, 1, 8, 8], labels int64 [n], holdout bool [n]) of the example files."""
    check_example_files(files, ["image", "label"], filesystem)
    table = pa.concat_tables([pq.read_table(p, filesystem=filesystem, columns=[
        c for c in ("image", "label", "split") if c in pq.read_schema(p, filesystem=filesystem).names]) for p in files],
        promote_options="default")
    images = table.column("image").combine_chunks()
    rows = pc.list_value_length(images).to_numpy(zero_copy_only=False)
    pixels = pc.list_flatten(images)
    cols = pc.list_value_length(pixels).to_numpy(zero_copy_only=False)
    if len(rows) and ((rows != rows[0]).any() or (cols != cols[0]).any()):
        raise SystemExit(f"example digits in {list(files)} must all be images of one size (h x w lists)")
    raw = pc.list_flatten(pixels).to_numpy(zero_copy_only=False).astype(np.uint8)
    raw = raw.reshape(len(rows), int(rows[0]) if len(rows) else 0, int(cols[0]) if len(cols) else 0)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(labels) and not ((labels >= 0) & (labels < _CLASSES)).all():
        raise SystemExit(f"example digits labels must lie in 0..{_CLASSES - 1}")
    holdout = (pc.equal(table.column("split"), "holdout").to_numpy(zero_copy_only=False).astype(bool)
               if "split" in table.column_names else np.zeros(len(labels), bool))
    return normalize_digits(raw), labels, holdout


def digits_traffic(root: str | Path, served: str, *, window_days: float = DEFAULT_LABEL_WINDOW_DAYS,
                   ) -> tuple[LabelledTraffic, np.ndarray, np.ndarray]:
    """The served model's labelled traffic: (the join and its report, normalised images [n, 1, 8, 8], labels [n]).

    Images whose bytes do not match their logged shape make the whole log unusable for this run:
    they are reported (`decode_error`), not trained on.
    """
    joined = read_labelled_traffic(root, served, image_columns(DIGITS_INPUT), classes=_CLASSES,
                                   window_days=window_days)
    x = np.zeros((joined.rows, 1, *DIGITS_SIZE), np.float32)
    try:
        sizes = {}
        for rows, images in decode_images(joined.table, DIGITS_INPUT):
            x[rows] = normalize_digits(images)
            sizes[f"{images.shape[1]}x{images.shape[2]}"] = int(len(rows))
        joined.report["image_sizes"] = sizes
    except ValueError as exc:
        joined.report["decode_error"] = str(exc)
        return joined, x[:0], np.zeros(0, np.int64)
    return joined, x, joined.table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)


def split_digits(x: np.ndarray, y: np.ndarray, traffic: np.ndarray, example_holdout: np.ndarray,
                 ) -> tuple[DigitsSplit, DigitsSplit, DigitsSplit]:
    """(train, validation, holdout): the example's own holdout rows, then the pixel hash (see the module doc)."""
    buckets = split_buckets(x.reshape(len(x), -1)) if len(x) else np.zeros(0, np.int64)
    holdout = example_holdout | (traffic & (buckets < HOLDOUT_PERCENT))
    validation = ~holdout & (buckets >= HOLDOUT_PERCENT) & (buckets < HOLDOUT_PERCENT + VALIDATION_PERCENT)
    train = ~holdout & ~validation

    def take(mask: np.ndarray) -> DigitsSplit:
        return DigitsSplit(x[mask], y[mask], traffic[mask])

    return take(train), take(validation), take(holdout)


def to_ray_dataset(split: DigitsSplit):
    """A Ray Dataset of a split: "image" (tensor [1, 8, 8]), "label" int64, "traffic" float32 (1.0 = traffic)."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({"image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.x)),
                      "label": pa.array(split.y, pa.int64()),
                      "traffic": pa.array(split.traffic.astype(np.float32))})
    return ray.data.from_arrow(table)


def digits_rows(root: str | Path, served: str, *, include_traffic: bool = True,
                window_days: float = DEFAULT_LABEL_WINDOW_DAYS) -> DigitsRows:
    """The example images and (unless not `include_traffic`) the served model's labelled traffic, split."""
    files = digits_example_files(root)
    fs = locate(str(root)).fs
    x_ex, y_ex, hold_ex = read_example_digits(files, fs)
    if include_traffic:
        joined, x_tr, y_tr = digits_traffic(root, served, window_days=window_days)
        sources = DataSources(files, joined.traffic_files, joined.label_files, filesystem=fs)
        report = joined.report
    else:
        x_tr, y_tr = np.zeros((0, *x_ex.shape[1:]), np.float32), np.zeros(0, np.int64)
        sources, report = DataSources(files, filesystem=fs), {"included": False}
    x = np.concatenate([x_ex, x_tr])
    y = np.concatenate([y_ex, y_tr])
    traffic = np.concatenate([np.zeros(len(y_ex), bool), np.ones(len(y_tr), bool)])
    example_holdout = np.concatenate([hold_ex, np.zeros(len(y_tr), bool)])
    train, validation, holdout = split_digits(x, y, traffic, example_holdout)
    return DigitsRows(sources, train, validation, holdout, report)
