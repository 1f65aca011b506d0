"""Write KServe v2 request bodies for a model, JSON and binary, for load generators.

    python -m benchmarks.bodies --model fraud --rows 1 --out /tmp/bodies
    # -> /tmp/bodies/fraud-json.body, /tmp/bodies/fraud-binary.body (+ .hlen: the header length)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tritonclient.http as tc

from serving.datatypes import numpy_dtype
from serving.registry import ModelRepository

__all__ = ["request_bodies", "main"]


def request_bodies(repository: str, model: str, rows: int = 1, seed: int = 0) -> dict[str, tuple[bytes, int | None]]:
    """{"json": (body, None), "binary": (body, header_length)} with random inputs of the model's shape."""
    spec = ModelRepository(repository).spec(model)
    rng = np.random.default_rng(seed)
    out = {}
    for kind in ("json", "binary"):
        inputs = []
        for t in spec.inputs:
            shape = ([rows] if spec.max_batch_size else []) + [1 if d == -1 else d for d in t.dims]
            data = rng.standard_normal(shape).astype(numpy_dtype(t.datatype))
            tensor = tc.InferInput(t.name, shape, t.datatype)
            tensor.set_data_from_numpy(data, binary_data=kind == "binary")
            inputs.append(tensor)
        outputs = [tc.InferRequestedOutput(t.name, binary_data=kind == "binary") for t in spec.outputs]
        body, json_size = tc.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
        out[kind] = (body, json_size)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/bodies")
    args = parser.parse_args(argv)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, (body, json_size) in request_bodies(args.repository, args.model, args.rows).items():
        path = folder / f"{args.model}-{kind}.body"
        path.write_bytes(body)
        if json_size is not None:
            (folder / f"{args.model}-{kind}.hlen").write_text(str(json_size))
        print(path, f"(header length {json_size})" if json_size is not None else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
