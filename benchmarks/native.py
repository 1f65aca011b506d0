"""The native kernels against their baselines, as the goals of issue 4 state them.

    python -m benchmarks.native [--repeats 15] [--quick] [--no-e2e]

Each case times the compiled kernel and its baseline in the same run, single
thread unless stated: warm-up excluded, samples interleaved (kernel, baseline,
kernel, ...) so that both see the same machine, the median per-call time of the
samples kept. Writes benchmarks/results/<timestamp>-native/report.json (git SHA,
machine, every sample) and ratios.png, and prints a markdown table with each
goal met or missed. A case that fails is recorded as an error, not dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from benchmarks.report import git_sha, machine

__all__ = ["main", "run", "time_pair"]

RESULTS = Path("benchmarks/results")


def _per_call_s(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_pair(native: Callable[[], object], baseline: Callable[[], object], repeats: int,
              sample_s: float = 0.02) -> dict:
    """Median per-call seconds of `native` and `baseline`, sampled alternately after a warm-up."""
    calls = {}
    for name, fn in (("native", native), ("baseline", baseline)):
        fn()  # warm-up, and a first estimate of the call's cost
        once = _per_call_s(fn, 1)
        calls[name] = max(1, int(sample_s / max(once, 1e-9)))
        _per_call_s(fn, calls[name])
    samples: dict[str, list[float]] = {"native": [], "baseline": []}
    for _ in range(repeats):
        samples["native"].append(_per_call_s(native, calls["native"]))
        samples["baseline"].append(_per_call_s(baseline, calls["baseline"]))
    return {name: {"median_us": statistics.median(s) * 1e6, "min_us": min(s) * 1e6, "calls_per_sample": calls[name],
                   "samples_us": [round(x * 1e6, 3) for x in s]} for name, s in samples.items()}


# -- the cases -------------------------------------------------------------------------------


def _v2_body(n: int, seed: int = 0) -> bytes:
    """A v2 JSON request of n FP32 values as tritonclient writes it (each value a float64 repr)."""
    import tritonclient.http as tc

    x = np.random.default_rng(seed).standard_normal((1, n)).astype(np.float32)
    tensor = tc.InferInput("input", [1, n], "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    body, _ = tc.InferenceServerClient.generate_request_body([tensor])
    return body


def _orjson_asarray(body: bytes) -> dict:
    doc = orjson.loads(body)
    for tensor in doc["inputs"]:
        tensor["data"] = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    return doc


def case_parse(core, n: int, repeats: int) -> dict:
    body = _v2_body(n)
    assert np.array_equal(core.parse_v2_json(body)["inputs"][0]["data"], _orjson_asarray(body)["inputs"][0]["data"])
    timing = time_pair(lambda: core.parse_v2_json(body), lambda: _orjson_asarray(body), repeats)
    return {"kernel": "parse_v2_json", "case": f"{n} FP32 values ({len(body)} bytes)", "target": 4.0,
            "baseline_is": "orjson.loads + np.asarray", **timing}


def case_standardize(core, reference, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1024, 30)).astype(np.float32)
    mean = rng.standard_normal(30).astype(np.float32)
    std = rng.uniform(0.5, 2.0, 30).astype(np.float32)
    out_a, out_b = np.empty_like(x), np.empty_like(x)
    timing = time_pair(lambda: core.standardize(x, mean, std, 5.0, out=out_a),
                       lambda: reference.standardize(x, mean, std, 5.0, out=out_b), repeats)
    return {"kernel": "standardize", "case": "1024 x 30 float32", "target": 3.0, "baseline_is": "NumPy reference",
            **timing}


def case_histogram(core, repeats: int) -> dict:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1024, 30)).astype(np.float32)
    # Per-feature quantile edges, as drift statistics use them.
    edges = np.ascontiguousarray(np.quantile(x, np.linspace(0, 1, 21), axis=0).T.astype(np.float32))
    counts = np.zeros((30, 22), np.int64)
    timing = time_pair(lambda: core.histogram(x, edges, counts),
                       lambda: [np.histogram(x[:, j], bins=edges[j]) for j in range(30)], repeats)
    return {"kernel": "histogram", "case": "1024 x 30, 20 bins (quantile edges)", "target": 10.0,
            "baseline_is": "np.histogram per column", **timing}


def _torch_batch(images: np.ndarray, mean, std, size: tuple[int, int]):
    import torch
    import torch.nn.functional as F

    # The fastest torch way found here: interpolate the channels-last view, then one contiguous copy.
    resized = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                            align_corners=False, antialias=False).contiguous()
    return resized.div_(255.0).sub_(mean).div_(std)


def case_resize(core, repeats: int) -> list[dict]:
    import torch

    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    images = list(batch)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    mean_t, std_t = torch.from_numpy(mean).view(1, 3, 1, 1), torch.from_numpy(std).view(1, 3, 1, 1)
    out = np.empty((64, 3, 64, 64), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _torch_batch(batch, mean_t, std_t, (64, 64)).numpy()
        assert np.abs(core.resize_normalize(images, 64, 64, mean, std) - expected).max() <= 1e-4
        one = time_pair(lambda: core.resize_normalize(images, 64, 64, mean, std, out=out),
                        lambda: _torch_batch(batch, mean_t, std_t, (64, 64)), repeats)
        two = time_pair(lambda: core.resize_normalize(images, 64, 64, mean, std, out=out, threads=2),
                        lambda: core.resize_normalize(images, 64, 64, mean, std, out=out), repeats)
    finally:
        torch.set_num_threads(threads)
    case = "64 images 96x96x3 -> 64x64"
    return [{"kernel": "resize_normalize", "case": case, "target": 1.5, "baseline_is": "torch interpolate + normalise",
             **one},
            {"kernel": "resize_normalize threads=2", "case": case, "target": 1.0,
             "baseline_is": "the kernel, threads=1", **two}]


# -- the run -------------------------------------------------------------------------------------


def _finish(result: dict) -> dict:
    native, baseline = result["native"]["median_us"], result["baseline"]["median_us"]
    result["ratio"] = round(baseline / native, 2)
    result["met"] = result["ratio"] >= result["target"] if result["target"] > 1 else result["ratio"] > 1.0
    return result


def run(repeats: int = 15, out_root: Path = RESULTS, end_to_end: bool = True) -> tuple[dict, Path]:
    """Run every case; returns the report and the folder it was written to."""
    from native import _core, _reference

    started = datetime.datetime.now()
    cases: list[tuple[str, Callable[[], dict | list[dict]]]] = [
        ("parse 784", lambda: case_parse(_core, 784, repeats)),
        ("parse 12288", lambda: case_parse(_core, 12288, repeats)),
        ("standardize", lambda: case_standardize(_core, _reference, repeats)),
        ("histogram", lambda: case_histogram(_core, repeats)),
        ("resize", lambda: case_resize(_core, repeats)),
    ]
    results, errors = [], []
    for name, case in cases:
        try:
            got = case()
            results.extend(_finish(r) for r in (got if isinstance(got, list) else [got]))
        except Exception as exc:  # recorded as data: the other cases still run
            errors.append({"case": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    report = {"kind": "native", "started_at": started.isoformat(timespec="seconds"), "git_sha": git_sha(),
              "machine": machine(), "config": {"repeats": repeats, "threads": 1, "statistic": "median per call"},
              "results": results, "errors": errors}
    if end_to_end:
        from benchmarks.native_e2e import e2e

        print("end to end, native kernels on and off (two fleet clusters, one after the other) ...", flush=True)
        try:
            report["end_to_end"] = e2e()
        except Exception as exc:  # recorded as data, like a failed case
            errors.append({"case": "end to end", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()})
    folder = out_root / f"{started:%Y%m%d-%H%M%S}-native"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    _plot(results, folder / "ratios.png")
    return report, folder


def markdown(report: dict) -> str:
    lines = ["| kernel | case | native µs | baseline µs | baseline | ratio | goal | |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in report["results"]:
        goal = f"≥ {r['target']:g}×" if r["target"] > 1 else "> 1×"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['native']['median_us']:.1f} | "
                     f"{r['baseline']['median_us']:.1f} | {r['baseline_is']} | {r['ratio']:.2f}× | {goal} | "
                     f"{'met' if r['met'] else 'missed'} |")
    lines += [f"| {e['case']} | error: {e['error']} | | | | | | missed |" for e in report["errors"]]
    if report.get("end_to_end"):
        from benchmarks.native_e2e import markdown as e2e_markdown

        lines += ["", "End to end (fleet defaults, wrk):", "", e2e_markdown(report["end_to_end"])]
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['kernel']}\n{r['case']}" for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(results) + 1))
    ax.barh(labels, [r["ratio"] for r in results], color=["tab:green" if r["met"] else "tab:red" for r in results])
    ax.scatter([r["target"] for r in results], labels, marker="|", s=400, color="black", label="goal")
    ax.set_xlabel("speed-up over the baseline (median per call)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="samples per kernel and baseline (median kept)")
    parser.add_argument("--quick", action="store_true", help="5 samples: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--no-e2e", action="store_true", help="kernels only: no end-to-end runs of fleet")
    args = parser.parse_args(argv)
    report, folder = run(5 if args.quick else args.repeats, args.out, end_to_end=not (args.no_e2e or args.quick))
    print(markdown(report))
    print(f"\n{folder / 'report.json'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
