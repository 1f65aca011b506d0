"""Where fleet's files live: a local folder, or any filesystem `pyarrow.fs` opens by URI.

The model repository, the prediction log, the labels and the training jobs' data all go
through here, so each takes the same roots:

    /srv/fleet/data                                          a local (or mounted) folder
    s3://bucket/fleet/data?region=eu-west-1                  S3 (credentials: the AWS chain)
    s3://bucket/data?endpoint_override=127.0.0.1:9000&scheme=http   an S3-compatible server
    gs://bucket/fleet/data                                   Google Cloud Storage

A URI's query (pyarrow's own options: `region`, `endpoint_override`, `scheme`, ...) belongs to
the root: `join_uri` puts sub-folders before it. On an object store a rename is a copy and a
delete, and a file cannot be appended to, but one object appears whole once its upload
completes; `write_whole` writes a file so that a reader sees all of it or nothing on both kinds.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

__all__ = ["Location", "locate", "is_uri", "check_root", "join_uri", "list_files", "write_whole", "read_bytes"]

# The schemes pyarrow.fs.FileSystem.from_uri opens (hdfs needs a JVM on the nodes).
_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(root: str) -> bool:
    """A URI (`scheme://...`) rather than a local path."""
    return "://" in str(root)


def check_root(root: str, what: str) -> str:
    """`root` if fleet can open it; ValueError naming `what`, the value and what is allowed.

    Opens nothing over the network: an S3 URI without `region` would make pyarrow ask AWS for
    the bucket's region, so its query is checked with a region filled in.
    """
    root = str(root)
    if not is_uri(root):
        return root
    parts = urlsplit(root)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"{what} {root!r}: unknown scheme {parts.scheme!r}; use a local path or a URI of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}")
    if scheme in ("s3", "gs", "gcs") and not parts.netloc:
        raise ValueError(f"{what} {root!r}: name the bucket ({scheme}://BUCKET/folder)")
    if scheme in ("s3", "gs", "gcs", "file"):
        probe = root
        if scheme == "s3" and "region" not in dict(parse_qsl(parts.query)):
            probe = f"{root}{'&' if parts.query else '?'}region=us-east-1"
        try:
            pafs.FileSystem.from_uri(probe)
        except Exception as exc:  # noqa: BLE001 - pyarrow says what is wrong (an unknown query key, ...)
            raise ValueError(f"{what} {root!r}: {exc}") from None
    return root


@dataclass(frozen=True)
class Location:
    """A root opened: its filesystem and its path there (no trailing '/'), and the root as given."""

    root: str
    fs: pafs.FileSystem
    path: str

    @property
    def local(self) -> bool:
        """On the local filesystem: renames are atomic, files can be appended to."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def sub(self, *parts: str) -> str:
        """The path of `parts` under the root, in the filesystem."""
        return posixpath.join(self.path, *parts)

    def show(self, path: str) -> str:
        """A path of this filesystem as a user reads it (with its scheme on an object store; no query)."""
        if self.local:
            return path
        return f"{urlsplit(self.root).scheme}://{path}"


def locate(root: str) -> Location:
    """Open `root` (a local path, made absolute, or a URI)."""
    root = str(root)
    if is_uri(root):
        fs, path = pafs.FileSystem.from_uri(root)
        return Location(root, fs, path.rstrip("/") or "/")
    return Location(root, pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root)))


def join_uri(root: str, *parts: str) -> str:
    """`root` with `parts` appended to its path, its query (if any) kept at the end."""
    root = str(root)
    if not is_uri(root):
        return os.path.join(root, *parts)
    base, sep, query = root.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + (sep + query if sep else "")


def list_files(fs: pafs.FileSystem, folder: str, suffix: str = ".parquet") -> list[str]:
    """Files ending in `suffix` anywhere under `folder`, sorted; none when it does not exist.

    A name starting with '.' or '_' anywhere below `folder` (a temporary file, a writer's
    in-flight work) is left out. One listing call per 1,000 objects on an object store.
    """
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    base = folder.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(suffix) or not info.path.startswith(base):
            continue
        if any(part.startswith((".", "_")) for part in info.path[len(base):].split("/")):
            continue
        out.append(info.path)
    return sorted(out)


def write_whole(fs: pafs.FileSystem, path: str, write: Callable[[str], None]) -> None:
    """`write(target)` such that `path` appears whole or not at all.

    Local: into a hidden temporary file beside it, then renamed (the folder is created). An
    object store: straight to `path` (the object appears when its upload completes; a failed
    upload leaves nothing).
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        write(path)
        return
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - it may never have been created
            pass
        raise


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file's bytes (FileNotFoundError when there is none)."""
    with fs.open_input_stream(path) as f:
        return f.read()
