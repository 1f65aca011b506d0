"""What every example model's published version is made of: its TorchScript bytes and its metadata.json.

Shared by the fraud and digits bootstraps (and the Ray Train job), so each
version records the same provenance: when, with which torch, from which data
(a SHA-256 fingerprint) and which checkout (the git SHA).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["export_torchscript", "load_torchscript", "arrays_sha256", "git_sha", "version_metadata"]


def export_torchscript(model: nn.Module) -> bytes:
    """Script `model` (in eval mode) and return the bytes of its TorchScript file (what `torch.jit.load` reads)."""
    scripted = torch.jit.script(model.eval())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """The module a worker would load from the file `data` (TorchScript bytes), in eval mode."""
    return torch.jit.load(io.BytesIO(data)).eval()


def arrays_sha256(*arrays: np.ndarray) -> str:
    """SHA-256 over the arrays' C-order bytes, in order: the training-data fingerprint."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def git_sha() -> str | None:
    """`git rev-parse HEAD` of the checkout this code runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip() if out.returncode == 0 else ""
    return sha or None


def version_metadata(
    *,
    training_data: Mapping,
    params: Mapping,
    metrics: Mapping,
    parent_version: int | None = None,
    **extra,
) -> dict:
    """A version's metadata.json: created_at (UTC), framework and git_sha filled in, then `extra` keys."""
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "framework": f"torch {torch.__version__}",
        "training_data": dict(training_data),
        "params": dict(params),
        "metrics": dict(metrics),
        "parent_version": parent_version,
        "git_sha": git_sha(),
        **extra,
    }
