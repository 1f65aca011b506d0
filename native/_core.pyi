import numpy as np
import numpy.typing as npt

def standardize(
    x: npt.NDArray[np.float32],
    mean: npt.NDArray[np.float32],
    std: npt.NDArray[np.float32],
    clip: float,
    out: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...
