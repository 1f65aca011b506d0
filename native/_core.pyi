from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def standardize(
    x: npt.NDArray[np.float32],
    mean: npt.NDArray[np.float32],
    std: npt.NDArray[np.float32],
    clip: float,
    out: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...
def histogram(
    x: npt.NDArray[np.float32],
    edges: npt.NDArray[np.float32],
    counts: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]: ...
def check_bounds(
    x: npt.NDArray[np.float32],
    lo: npt.NDArray[np.float32],
    hi: npt.NDArray[np.float32],
    first: npt.NDArray[np.int32],
    counts: npt.NDArray[np.int64],
) -> int: ...
def resize_normalize(
    images: Sequence[npt.NDArray[np.uint8]],
    out_h: int,
    out_w: int,
    mean: npt.NDArray[np.float32],
    std: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32] | None = None,
    *,
    threads: int = 1,
) -> npt.NDArray[np.float32]: ...
def parse_v2_json(body: bytes | bytearray | memoryview) -> dict | list | str | int | float | bool | None: ...
def otlp_spans(traces: list, offset_ns: int) -> bytes: ...
