"""Small file helpers that work the same on a local path and a cloud URI (s3://, gs://).

pyarrow's filesystems resolve the URI; that is the same layer Ray Data and Ray Train use,
so credentials configured for them work here too.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import BinaryIO

import pyarrow.fs as pafs

from .config import is_uri


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write via a temporary name then move, so a crash never leaves a half-written file."""
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, p)


def upload(local: str, dest: str) -> None:
    """Copy a local file or folder to a path or URI. pyarrow's copy_files does not create
    the destination folder on filesystems that have folders (file://, local)."""
    fs, p = filesystem(dest)
    fs.create_dir(p if os.path.isdir(local) else posixpath.dirname(p), recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def join(base: str, *parts: str) -> str:
    """base/part/...: '/' between the parts of a URI, the OS separator for a local path."""
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def size(path: str) -> int:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"not a file: {path}")
    return int(info.size)


def list_files(folder: str, recursive: bool = False) -> list[str]:
    """The files in a folder (directly in it, or at any depth), as paths or URIs like
    `folder`, sorted; [] if it is missing."""
    rel = (r for r, kind in _entries(folder, recursive) if kind == pafs.FileType.File)
    return sorted(join(folder, *r.split("/")) for r in rel)


def _entries(folder: str, recursive: bool) -> list[tuple[str, pafs.FileType]]:
    """(path below `folder`, type) of what the folder holds; [] if it is missing."""
    fs, p = filesystem(folder)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    base = p.rstrip("/") + "/"
    return [(i.path[len(base):], i.type) for i in fs.get_file_info(pafs.FileSelector(p, recursive=recursive))]


def open_read(path: str) -> BinaryIO:
    """A buffered, seekable binary reader (ranged reads on object stores)."""
    if not is_uri(path):
        return open(os.path.expanduser(path), "rb")  # the caller closes it
    fs, p = filesystem(path)
    return io.BufferedReader(fs.open_input_file(p), 1 << 20)


def open_write(path: str) -> BinaryIO:
    """A binary writer, its folder made first. Object stores publish the file on close."""
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    return fs.open_output_stream(p)


def move_folder(src: str, dst: str) -> None:
    """Move every file under src to the same place under dst (object stores have no folders
    to rename: file by file there, one rename locally)."""
    if not is_uri(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        os.replace(src, dst)
        return
    fs, p = filesystem(src)
    _, q = filesystem(dst)
    base = p.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.type == pafs.FileType.File:
            to = f"{q.rstrip('/')}/{info.path[len(base):].lstrip('/')}"
            fs.create_dir(posixpath.dirname(to), recursive=True)
            fs.move(info.path, to)


def local_copy(path: str, dest: str | None = None) -> str:
    """A local copy of a cloud file or (small) folder, e.g. a tokenizer or a checkpoint; a
    local path as it is. With `dest`, the copy lands there through a temporary name (a
    download cut short never looks complete) and an existing `dest` is reused as a cache."""
    if not is_uri(path):
        return path
    import tempfile

    fs, src = filesystem(path)
    is_file = fs.get_file_info(src).type == pafs.FileType.File
    if dest is None:
        folder = tempfile.mkdtemp(prefix="zhchat-")
        dest = os.path.join(folder, posixpath.basename(src)) if is_file else folder
    elif os.path.exists(dest):
        return dest
    tmp = dest + ".part"
    remove(tmp)  # a partial earlier download
    os.makedirs(os.path.dirname(tmp) if is_file else tmp, exist_ok=True)
    pafs.copy_files(src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, dest)
    return dest


def list_dirs(folder: str) -> list[str]:
    """The names of the folders directly in `folder`, sorted; [] if it is missing."""
    # In an object store a folder is only a prefix of its files' keys, and a non-recursive
    # listing may leave such prefixes out (pyarrow's GCS client does): there the names come
    # from the keys below.
    return sorted({r.split("/", 1)[0] for r, kind in _entries(folder, recursive=is_uri(folder))
                   if "/" in r or kind == pafs.FileType.Directory})


def remove(path: str) -> None:
    """Delete a file or a folder with everything in it; nothing if it does not exist."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)
