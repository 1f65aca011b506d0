"""Check a decoded request against the model's config before it is queued."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.errors import InvalidInput
from serving.limits import over_limit
from serving.model_config import ModelSpec, TensorSpec
from serving.protocol import InferRequest

__all__ = ["ValidatedRequest", "validate_request"]


@dataclass(frozen=True)
class ValidatedRequest:
    inputs: dict[str, np.ndarray]
    rows: int  # batch rows (1 for a model without a batch dimension)
    outputs: tuple[tuple[TensorSpec, bool], ...]  # (output, binary) in response order


def _dims_match(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    return expected == got or (len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got)))


def _shown(spec: TensorSpec, max_batch_size: int) -> list:
    return spec.metadata(max_batch_size)["shape"]


def validate_request(request: InferRequest, spec: ModelSpec, *, max_elements: int = 1 << 26,
                     max_batch_rows: int = 0) -> ValidatedRequest:
    """Match inputs to the model's by name, datatype and shape; resolve the outputs asked for.

    Raises InvalidInput saying what is expected for a missing, unknown or
    mis-shaped input, a wrong datatype, a batch over max_batch_size or over the
    server's `max_batch_rows` (0: none), an input over `max_elements`, or an
    unknown output.
    """
    given = {t.name: t for t in request.inputs}
    unknown = [name for name in given if spec.input(name) is None]
    if unknown:
        unknown.sort()
        raise InvalidInput(
            f"model {spec.name!r} has no input {unknown[0]!r}; its inputs are {[s.name for s in spec.inputs]}"
        )
    batching = spec.max_batch_size > 0
    rows = None
    arrays: dict[str, np.ndarray] = {}
    for ispec in spec.inputs:
        tensor = given.get(ispec.name)
        if tensor is None:
            if ispec.optional:
                continue
            raise InvalidInput(f"model {spec.name!r} needs input {ispec.name!r}; the request does not have it")
        if tensor.datatype != ispec.datatype:
            raise InvalidInput(
                f"input {ispec.name!r}: datatype {tensor.datatype} does not match the model's {ispec.datatype}"
            )
        shape = tensor.shape
        if tensor.data.size > max_elements:
            raise InvalidInput(over_limit(f"input {ispec.name!r}: {tensor.data.size} elements",
                                          max_elements, "max_tensor_elements", " elements"))
        if batching:
            if len(shape) == 0 or not _dims_match(ispec.dims, shape[1:]):
                raise InvalidInput(
                    f"input {ispec.name!r}: shape {list(shape)} does not match the model's "
                    f"{_shown(ispec, spec.max_batch_size)} (first dimension is the batch)"
                )
            n = shape[0]
            if not 1 <= n <= spec.max_batch_size:
                raise InvalidInput(
                    f"input {ispec.name!r}: batch size {n} is outside 1..{spec.max_batch_size} (max_batch_size)"
                )
            if max_batch_rows and n > max_batch_rows:
                raise InvalidInput(over_limit(f"input {ispec.name!r}: a batch of {n} rows", max_batch_rows,
                                              "max_batch_rows", " rows"))
            if rows is not None and n != rows:
                raise InvalidInput(f"inputs disagree on the batch size: {rows} and {n} ({ispec.name!r})")
            rows = n
        elif not _dims_match(ispec.dims, shape):
            raise InvalidInput(
                f"input {ispec.name!r}: shape {list(shape)} does not match the model's {list(ispec.dims)}"
            )
        arrays[ispec.name] = tensor.data

    if request.outputs is None:
        outputs = tuple((o, request.binary_output) for o in spec.outputs)
    else:
        chosen = []
        for req in request.outputs:
            ospec = spec.output(req.name)
            if ospec is None:
                raise InvalidInput(
                    f"model {spec.name!r} has no output {req.name!r}; its outputs are {[o.name for o in spec.outputs]}"
                )
            chosen.append((ospec, request.binary_output if req.binary is None else req.binary))
        outputs = tuple(chosen)
    return ValidatedRequest(arrays, rows or 1, outputs)
