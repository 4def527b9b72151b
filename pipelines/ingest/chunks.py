"""Files -> chunks -> records: the streaming part of ingest, still without Ray.

A line-based file is cut into byte ranges that start at a line (for chitchat: a dialogue)
start, each tagged with its first line number, so workers parse chunks independently and
still report true 1-based line numbers. A gzip file, a whole JSON document and a text_file
document are one chunk each; JSON documents are read incrementally with ijson so memory
holds one record at a time, never the document.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import zlib
from typing import Any, BinaryIO, Iterator

import ijson

from zhchat import storage
from zhchat.tables import dialogue_row, quarantine_row

from . import readers
from .readers import INVALID_UTF8_MARK, JSON_RECORD_PARSERS, LINE_PARSERS

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
# Longer lines (or dialogues, or documents) are quarantined rather than held in memory:
# no dialogue corpus has records this size, a wrongly chosen format does.
MAX_LINE_BYTES = 16 << 20
MAX_BLOCK_LINES = 10_000
MAX_DOCUMENT_BYTES = 64 << 20

# A result of reading: ("ok", dialogue row) | ("skip", reason) | ("bad", quarantine row)
Result = tuple[str, Any]


# ---- finding and opening files ----------------------------------------------------------

def list_files(inputs: list[str]) -> list[str]:
    """Every file under the inputs, folders walked recursively, hidden files skipped.

    A hidden file or folder (name starting with '.') below a given folder is skipped; a
    file named explicitly is always read. Order is stable (sorted per input).
    """
    found: list[str] = []
    for given in inputs:
        if storage.is_dir(given):
            base = given.rstrip("/")
            for p in storage.list_files(given, recursive=True):
                rel = p[len(base):].lstrip("/").replace(os.sep, "/")
                if not any(part.startswith(".") for part in rel.split("/")):
                    found.append(p)
        elif storage.exists(given):
            found.append(given)
        else:
            raise FileNotFoundError(f"input does not exist: {given}")
    seen: set[str] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def is_gzip(path: str) -> bool:
    with storage.open_read(path) as f:
        return f.read(2) == GZIP_MAGIC


def open_binary(path: str, compressed: bool) -> BinaryIO:
    f = storage.open_read(path)
    if not compressed:
        return f
    gz = gzip.GzipFile(fileobj=f, mode="rb")
    gz.myfileobj = f  # what gzip.open(filename) sets so that close() closes the file too
    return gz


def read_head(path: str, n: int = 65536) -> tuple[bytes, bool, bool]:
    """First n (decompressed) bytes, whether that is the whole file, whether it is gzip."""
    compressed = is_gzip(path)
    parts: list[bytes] = []
    got = 0
    with open_binary(path, compressed) as f:
        try:
            while got <= n:
                part = f.read(min(8192, n + 1 - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except (EOFError, zlib.error):  # a truncated gzip: detect from what it holds; reading says where it breaks
            if not parts:
                raise
    head = b"".join(parts)
    return head[:n], len(head) <= n, compressed


# ---- splitting into chunks --------------------------------------------------------------

def make_chunk(path: str, fmt: str, layout: str, compressed: bool = False, start: int = 0,
               end: int = -1, first_line: int = 1, error: str = "", size: int = 0) -> dict:
    """A piece of one file to parse. end=-1 reads to the end; error set: quarantine the file.
    `size` is the bytes it spans on disk, used to pack small chunks into one task."""
    return {"path": path, "format": fmt, "layout": layout, "compressed": compressed,
            "start": start, "end": end, "first_line": first_line, "error": error, "size": size}


def pack_chunks(chunks: list[dict], target_bytes: int) -> list[list[dict]]:
    """Consecutive chunks grouped into tasks of about target_bytes: a folder of ten thousand
    small files becomes a few tasks, not ten thousand."""
    units: list[list[dict]] = []
    size = 0
    for c in chunks:
        if not units or size + c["size"] > target_bytes:
            units.append([])
            size = 0
        units[-1].append(c)
        size += c["size"]
    return units


def _boundary(buf: bytes, frm: int, blocks: bool) -> int:
    """Offset just after the first line end (blocks: blank line) at or after frm, or -1."""
    if not blocks:
        i = buf.find(b"\n", frm)
        return -1 if i < 0 else i + 1
    while True:
        i = buf.find(b"\n", frm)
        if i < 0:
            return -1
        j = i + 1
        if buf.startswith(b"\n", j):
            return j + 1
        if buf.startswith(b"\r\n", j):
            return j + 2
        if j >= len(buf) - 1:  # the blank line may start in the next piece
            return -1
        frm = j


def split_file(path: str, fmt: str, layout: str, chunk_bytes: int, compressed: bool,
               piece_bytes: int = 8 << 20) -> list[dict]:
    """Byte-range chunks of a line-based file, each starting at a line (blocks: dialogue) start.

    One sequential pass counting newlines at C speed gives each chunk's first line number;
    memory stays at one piece (8 MB) whatever the file size.
    """
    size = storage.size(path)
    if compressed or layout in ("json", "whole") or size <= chunk_bytes:
        return [make_chunk(path, fmt, layout, compressed, size=size)]
    blocks = layout == "blocks"
    chunks: list[dict] = []
    start, start_line = 0, 1
    lines_before = 0           # newlines in [0, base)
    base = 0                   # file offset of buf[0]
    buf = b""
    with open_binary(path, False) as f:
        while True:
            piece = f.read(piece_bytes)
            if not piece:
                break
            buf += piece
            while True:
                frm = max(0, start + chunk_bytes - base)
                if frm >= len(buf):
                    break
                cut = _boundary(buf, frm, blocks)
                if cut < 0:
                    break
                line = lines_before + buf.count(b"\n", 0, cut) + 1
                if base + cut < size:
                    chunks.append(make_chunk(path, fmt, layout, False, start, base + cut, start_line,
                                             size=base + cut - start))
                    start, start_line = base + cut, line
                else:
                    break
            # Keep two bytes so a blank line ("\n\r\n") across pieces is still found.
            keep = 2 if blocks else 0
            drop = max(0, len(buf) - keep)
            lines_before += buf.count(b"\n", 0, drop)
            base += drop
            buf = buf[drop:]
    chunks.append(make_chunk(path, fmt, layout, False, start, -1, start_line, size=size - start))
    return chunks


# ---- reading a chunk --------------------------------------------------------------------

def _qrow(path: str, line: int, reason: str, record: str | bytes) -> dict:
    if isinstance(record, str):
        # Lone surrogates (from a JSON escape) cannot be written as UTF-8: show them escaped.
        record = record.replace(INVALID_UTF8_MARK, "\ufffd").encode("utf-8", "backslashreplace")
    return quarantine_row(path, line, reason.encode("utf-8", "backslashreplace").decode("utf-8"), record)


def _result(parsed: readers.Parsed, path: str, line: int, record: str | bytes, where: str = "") -> Result:
    kind, value = parsed
    if kind == "ok":
        turns, system = value
        return "ok", dialogue_row(turns, path, system)
    if kind == "skip":
        return "skip", value
    return "bad", _qrow(path, line, value + where, record)


def _decode(raw: bytes) -> tuple[str | None, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of the line (input must be UTF-8)"


class ReadBroken(Exception):
    """The file could not be read past `line` (truncated gzip, I/O error)."""

    def __init__(self, line: int, err: BaseException):
        super().__init__(f"{type(err).__name__}: {err}")
        self.line = line


def _readline(f: BinaryIO, line: int) -> bytes:
    try:
        return f.readline(MAX_LINE_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise ReadBroken(line, e) from e


def iter_lines(f: BinaryIO, start: int, end: int, first_line: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its line end) for lines starting in [start, end).

    A line over MAX_LINE_BYTES is yielded as None after skipping it, not read into memory.
    """
    if start:
        f.seek(start)
    pos, line = start, first_line
    while end < 0 or pos < end:
        raw = _readline(f, line)
        if not raw:
            return
        pos += len(raw)
        if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # skip the rest of an over-long line
                more = _readline(f, line)
                pos += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield line, None
        else:
            if line == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            yield line, raw.rstrip(b"\n").rstrip(b"\r")
        line += 1


def read_lines(f: BinaryIO, chunk: dict) -> Iterator[Result]:
    path = chunk["path"]
    parse = LINE_PARSERS[(chunk["format"], chunk["layout"])]
    for line, raw in iter_lines(f, chunk["start"], chunk["end"], chunk["first_line"]):
        if raw is None:
            yield "bad", _qrow(path, line, f"line longer than {MAX_LINE_BYTES >> 20} MB", b"")
            continue
        text, err = _decode(raw)
        if text is None:
            yield "bad", _qrow(path, line, err, raw)
        elif not text.strip():
            yield "skip", "blank line"
        else:
            yield _result(parse(text), path, line, raw)


def read_blocks(f: BinaryIO, chunk: dict) -> Iterator[Result]:
    """GPT2-chitchat: a dialogue is a run of non-blank lines; blank lines separate them."""
    path = chunk["path"]
    lines: list[str] = []
    raws: list[bytes] = []
    first = 0
    problem = ""        # why this dialogue is quarantined, if it is
    problem_line = 0

    def flush() -> Iterator[Result]:
        if problem:
            yield "bad", _qrow(path, problem_line, problem, b"\n".join(raws)[:4000])
        elif lines:
            yield _result(readers.chitchat_block(lines), path, first, b"\n".join(raws))

    for line, raw in iter_lines(f, chunk["start"], chunk["end"], chunk["first_line"]):
        if raw is not None and not raw.strip():
            yield from flush()
            lines, raws, problem = [], [], ""
            continue
        if not lines and not problem:
            first = line
        if problem:
            continue
        if raw is None:
            problem, problem_line = f"line {line} is longer than {MAX_LINE_BYTES >> 20} MB", line
            continue
        text, err = _decode(raw)
        if text is None:
            problem, problem_line = f"{err}; the dialogue starting at line {first} is quarantined with it", line
        elif len(lines) >= MAX_BLOCK_LINES:
            problem, problem_line = (f"dialogue longer than {MAX_BLOCK_LINES:,} lines "
                                     "(is this really GPT2-chitchat, blank-line separated?)"), first
        else:
            lines.append(text)
        raws.append(raw)
    yield from flush()


class Utf8Marked:
    """A byte stream re-encoded as valid UTF-8, with each invalid byte replaced by a mark.

    The JSON parser would otherwise stop at the first invalid byte and lose the rest of the
    document; with the mark, only the record holding it is quarantined.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        # read1 hands over what one underlying read gave, so a truncated gzip loses nothing
        # before the break (read(n) drops its partial result when it hits the end).
        self._read = getattr(raw, "read1", raw.read)
        self.dec = codecs.getincrementaldecoder("utf-8")("zhchat-mark")
        self.first = True

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson probes with read(0) to learn whether the stream gives bytes or str
            return b""
        n = n if n > 0 else 1 << 16
        while True:
            data = self._read(n)
            text = self.dec.decode(data, final=not data)
            if self.first and text:
                text, self.first = text.removeprefix("\ufeff"), False
            if text or not data:
                return text.encode("utf-8")


codecs.register_error("zhchat-mark", lambda e: (INVALID_UTF8_MARK, e.end))


def iter_json_records(stream) -> Iterator[tuple[str, Any, bool]]:
    """(label, value, is_record) for each record of a JSON document, one at a time.

    A top-level array yields its items (label "[i]"); a top-level object of arrays (LCCC's
    {"train": [...], "valid": [...]}) yields each array's items (label "train[i]"). A key
    whose value is not an array, or a scalar document, yields is_record=False.
    """
    events = ijson.basic_parse(stream, use_float=True)
    for ev, val in events:
        if ev == "start_array":
            yield from _items(events, "")
        elif ev == "start_map":
            for ev2, key in events:
                if ev2 == "end_map":
                    break
                for ev3, val3 in events:  # the key's value: exactly one event starts it
                    if ev3 == "start_array":
                        yield from _items(events, key)
                    else:
                        yield repr(key), _build(ev3, val3, events), False
                    break
        else:
            yield "document", val, False
        break
    for _ in events:  # let the parser check the end of the document (no trailing data)
        pass


def _items(events, label: str) -> Iterator[tuple[str, Any, bool]]:
    i = 0
    for ev, val in events:
        if ev == "end_array":
            return
        yield f"{label}[{i}]", _build(ev, val, events), True
        i += 1


def _build(ev: str, val: Any, events) -> Any:
    if ev not in ("start_map", "start_array"):
        return val
    b = ijson.ObjectBuilder()
    b.event(ev, val)
    depth = 1
    for ev, val in events:
        b.event(ev, val)
        if ev in ("start_map", "start_array"):
            depth += 1
        elif ev in ("end_map", "end_array"):
            depth -= 1
            if depth == 0:
                break
    return b.value


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:4000]


def read_json(f: BinaryIO, chunk: dict) -> Iterator[Result]:
    """Records of a whole JSON document. Their line is unknown: `line` holds the record number."""
    path = chunk["path"]
    parse = JSON_RECORD_PARSERS[(chunk["format"], chunk["layout"])]
    n = 0
    try:
        for label, value, is_record in iter_json_records(Utf8Marked(f)):
            n += 1
            where = f" (JSON record {label}; line unknown, `line` holds the record number)"
            if is_record:
                yield _result(parse(value), path, n, _dump(value), where)
            else:
                what = "the document is" if label == "document" else f"key {label} holds"
                yield "bad", _qrow(path, n, f"{what} {readers._type(value)}, expected a list of records", _dump(value))
    except ijson.JSONError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        yield "bad", _qrow(path, n + 1, f"invalid JSON after record {n}: {msg}; the rest of the file could not be read "
                                        "(`line` holds the record number)", "")
    except (OSError, EOFError, zlib.error) as e:  # e.g. a truncated gzip
        yield "bad", _qrow(path, n + 1, f"the file could not be read after record {n}: {type(e).__name__}: {e} "
                                        "(`line` holds the record number)", "")


def read_whole(f: BinaryIO, chunk: dict) -> Iterator[Result]:
    path = chunk["path"]
    data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        yield "bad", _qrow(path, 1, f"document larger than {MAX_DOCUMENT_BYTES >> 20} MB (use text_lines for one document per line)", data[:2000])
        return
    data = data.removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield "bad", _qrow(path, line, f"invalid UTF-8 at byte {e.start} (line {line}); the document is quarantined (input must be UTF-8)", data[:2000])
        return
    yield _result(readers.text_document(text), path, 1, text)


READERS = {"tsv": read_lines, "jsonl": read_lines, "lines": read_lines,
           "blocks": read_blocks, "json": read_json, "whole": read_whole}


def read_chunk(chunk: dict) -> Iterator[Result]:
    """Every record of one chunk. Never raises on bad input: a file that breaks off
    (truncated gzip, I/O error) ends with one quarantine row saying where and why."""
    path = chunk["path"]
    if chunk["error"]:
        yield "bad", _qrow(path, 0, chunk["error"], "")
        return
    n = 0
    try:
        with open_binary(path, chunk["compressed"]) as f:
            for res in READERS[chunk["layout"]](f, chunk):
                n += 1
                yield res
    except ReadBroken as e:
        yield "bad", _qrow(path, e.line, f"the file could not be read from line {e.line} on: {e}", "")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        yield "bad", _qrow(path, 0, f"the file could not be read further after {n:,} records "
                                    f"(`line` 0: position unknown): {type(e).__name__}: {e}", "")


def display_path(path: str) -> str:
    """Shorter path for tables: relative to the working directory when below it."""
    if "://" in path:
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
