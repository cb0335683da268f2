"""A GGUF file's header read as untrusted input: metadata and tensor table, every length bounded.

A GGUF file comes from strangers. Every count, string length and array length in its header is
checked against the bytes that remain before anything is allocated for it, every tensor's byte
size is computed from its type and shape (never taken from the file) and must lie inside the
file's data section. Each failure is one `UserError` naming the file and the key or tensor.
`fields` records where each header number lies (for the fuzz tests that mutate them).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value type -> (struct format, size) of the scalar types
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9
@dataclass
class TensorInfo:
    name: str
    type: int
    shape: list[int]  # rows first (reversed from GGUF's ne order): (out, in) for a matrix
    offset: int  # absolute, in the file
    bytes: int


@dataclass
class Header:
    meta: dict
    tensors: list[TensorInfo]
    data_start: int
    fields: list = field(default_factory=list)  # (what, position, struct format) of each header number


class _Reader:
    def __init__(self, buf, path: Path, fields: list):
        self.buf, self.pos, self.path, self.fields = buf, 0, path, fields

    def fail(self, what: str):
        raise UserError(f"{self.path}: {what}")

    def num(self, fmt: str, size: int, what: str):
        if self.pos + size > len(self.buf):
            self.fail(f"header ends inside {what} (truncated file)")
        self.fields.append((what, self.pos, fmt))
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def count(self, what: str, least_bytes: int) -> int:
        """A u64 count of items of at least `least_bytes` each, bounded by the bytes left."""
        n = self.num("<Q", 8, what)
        if n * least_bytes > len(self.buf) - self.pos:
            self.fail(f"{what} is {n}, more than the file's remaining {len(self.buf) - self.pos} bytes can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1)
        raw = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in SCALARS:
            return self.num(*SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY and depth == 0:
            itype = self.num("<I", 4, f"item type of {what}")
            least = SCALARS[itype][1] if itype in SCALARS else 8 if itype == STRING else 12
            n = self.count(f"length of {what}", least)
            if itype in SCALARS and itype != 7:  # numbers: one bounded slice, no per-item objects
                import numpy as np

                fmt, size = SCALARS[itype]
                items = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos).tolist()
                self.pos += n * size
                return items
            return [self.value(itype, what, depth + 1) for _ in range(n)]
        self.fail(f"{what} has an unknown value type {vtype}")


def read_header(path: Path) -> Header:
    """The metadata (key -> int, float, bool, str or list) and the tensor table of a GGUF file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise UserError(f"{path}: not a GGUF file ({size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    view = memoryview(buf)
    try:
        return _parse(_Reader(view, path, []), size)
    finally:
        view.release()
        buf.close()


def _parse(r: _Reader, size: int) -> Header:
    if bytes(r.buf[:4]) != MAGIC:
        r.fail("not a GGUF file (no GGUF magic)")
    r.pos = 4
    version = r.num("<I", 4, "version")
    if version not in (2, 3):
        r.fail(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = r.count("tensor count", 24)  # a tensor's entry takes at least 24 bytes
    n_kv = r.count("metadata count", 13)  # a key/value pair at least 13
    meta, key = {}, None
    for i in range(n_kv):
        key = r.string(f"metadata key {i}" + (f" (the one after {key})" if key else ""))
        vtype = r.num("<I", 4, f"type of {key}")
        meta[key] = r.value(vtype, key)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1) or align > 1 << 20:
        r.fail(f"general.alignment={align!r} is not a power of two")
    tensors, names, name = [], set(), None
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}" + (f" (the one after {name})" if name else ""))
        if name in names:
            r.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = r.num("<I", 4, f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            r.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        ne = [r.num("<Q", 8, f"dimension {d} of {name}") for d in range(n_dims)]
        ttype = r.num("<I", 4, f"type of {name}")
        offset = r.num("<Q", 8, f"offset of {name}")
        tensors.append((name, ne, ttype, offset))
    data_start = -(-r.pos // align) * align
    import gguf  # its table of block sizes (only here: importing it costs a fifth of a second)

    out = []
    for name, ne, ttype, offset in tensors:
        try:
            tname = gguf.GGMLQuantizationType(ttype).name
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            r.fail(f"tensor {name} has an unknown type id {ttype}")
        if any(d < 1 for d in ne):
            r.fail(f"tensor {name} has an empty dimension {ne}")
        if ne[0] % block:
            r.fail(f"tensor {name}: a row of {ne[0]} values is not whole {tname} blocks of {block}")
        count = 1
        for d in ne:
            count *= d
        nbytes = count // block * block_bytes
        if offset % align:
            r.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {align}")
        if data_start + offset + nbytes > size:
            r.fail(f"tensor {name} ({tname} {list(reversed(ne))}, {nbytes} bytes at {offset}) ends past the file's "
                   f"end ({size - data_start} bytes of data)")
        out.append(TensorInfo(name, ttype, list(reversed(ne)), data_start + offset, nbytes))
    _check_layout(r, out, size, align)
    return Header(meta, out, data_start, r.fields)


def _check_layout(r: _Reader, tensors: list[TensorInfo], size: int, align: int):
    """Tensors lie one after another, each padded to the alignment: a tensor whose type or shape does not
    match its data leaves a gap or overlaps the next one."""
    ordered = sorted(tensors, key=lambda t: t.offset)
    for t, nxt in zip(ordered, ordered[1:] + [None]):
        gap = (size if nxt is None else nxt.offset) - (t.offset + t.bytes)
        if nxt is not None and gap < 0:
            r.fail(f"tensor {t.name} ({t.bytes} bytes for its type and shape) overlaps tensor {nxt.name}")
        if gap >= align:
            r.fail(f"tensor {t.name}: its type and shape make {t.bytes} bytes, but its data runs {gap} bytes "
                   f"further (to {'the end of the file' if nxt is None else 'tensor ' + nxt.name})")
