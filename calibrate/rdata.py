"""A reader for R's serialization format and lazy-load databases, without R.

R stores package data (``data/Rdata.rdb`` + ``Rdata.rdx``) and ``.rds`` files in its own binary
serialization format. This module reads the subset that data packages use: atomic vectors,
character vectors with their encodings, lists, pairlists, attributes (so factors and data frames),
symbols, references, environments and the compact ALTREP sequences R >= 3.5 writes.

Format reference: R Internals manual, section "Serialization Formats", and R's
``src/main/serialize.c``. Only the XDR (big-endian binary, header ``X\\n``) flavour is read: it is
what ``saveRDS``, ``save`` and the lazy-load machinery write by default.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXPTYPE codes (Rinternals.h).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP = 7, 8, 9, 10, 13, 14
CPLXSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP, EXTPTRSXP, WEAKREFSXP = 15, 16, 17, 19, 20, 22, 23
RAWSXP, S4SXP = 24, 25

# Pseudo-types that only exist in the stream (serialize.c).
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP = 247, 242, 241
ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 240, 239, 238

# Flag-word bits: type in bits 0-7, then object, attribute, tag; "levels" (gp) from bit 12.
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
# CHARSXP encoding bits inside the levels field.
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6

NA_INTEGER = -(2**31)

_PAIRLIST_TYPES = (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP)
_SINGLETONS = {
    GLOBALENV_SXP: "R_GlobalEnv",
    UNBOUNDVALUE_SXP: "R_UnboundValue",
    MISSINGARG_SXP: "R_MissingArg",
    BASENAMESPACE_SXP: "R_BaseNamespace",
    EMPTYENV_SXP: "R_EmptyEnv",
    BASEENV_SXP: "R_BaseEnv",
}


class RDataError(ValueError):
    """The bytes are not an R serialization this reader understands."""


@dataclass
class RSymbol:
    """An R symbol (``SYMSXP``)."""

    name: str


@dataclass
class RObject:
    """One R value that is not a bare symbol.

    Attributes:
        sexptype: R's SEXPTYPE code (``STRSXP``, ``VECSXP``, ...).
        value: the payload. Atomic vectors: a list (``None`` for NA strings; ints keep
            ``NA_INTEGER``); raw vectors: ``bytes``; lists: a list of ``RObject``/``RSymbol``/
            ``None``; pairlists: a list of ``(tag, value)``; environments: a dict of the frame;
            singletons such as ``R_GlobalEnv``: their name.
        attributes: R attributes by name (``names``, ``class``, ``levels``, ``row.names``, ...).
    """

    sexptype: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str | None] | None:
        """Return the ``names`` attribute as Python strings, or None when absent."""
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None

    def classes(self) -> list[str]:
        """Return the ``class`` attribute (empty when absent)."""
        cls = self.attributes.get("class")
        return [c for c in cls.value if c is not None] if isinstance(cls, RObject) else []


class _Reader:
    """Stateful cursor over one serialized stream (the reference table lives here)."""

    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    # -- primitives (XDR: big-endian) --
    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RDataError(f"truncated R serialization at byte {self.pos} (wanted {n} more)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves follow
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        return n

    # -- header --
    def header(self) -> None:
        magic = bytes(self._take(2))
        if magic != b"X\n":
            raise RDataError(f"unsupported R serialization format {magic!r}; this reader reads XDR")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            enc = bytes(self._take(self.int())).decode("ascii")
            self.native_encoding = "latin-1" if enc.upper() in ("ISO-8859-1", "LATIN1") else enc
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}; this reads 2 and 3")

    # -- items --
    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        levels = flags >> 12
        if sxp == NILVALUE_SXP:
            return None
        if sxp in _SINGLETONS:
            return RObject(ENVSXP, _SINGLETONS[sxp])
        if sxp == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sxp in (NAMESPACESXP, PACKAGESXP, PERSISTSXP):
            if self.int() != 0:
                raise RDataError("malformed persistent-name string vector")
            obj = RObject(sxp, [self.item() for _ in range(self.length())])
            self.refs.append(obj)
            return obj
        if sxp == SYMSXP:
            sym = RSymbol(self.item().value[0])
            self.refs.append(sym)
            return sym
        if sxp == ENVSXP:
            return self._environment()
        if sxp in _PAIRLIST_TYPES:
            return self._pairlist(flags)
        if sxp == ALTREP_SXP:
            return self._altrep()
        if sxp == CHARSXP:
            return RObject(CHARSXP, [self._charsxp(levels)])
        obj = self._vector(sxp, levels)
        if flags & _HAS_ATTR:
            obj.attributes = self._attributes(self.item())
        return obj

    def _charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = bytes(self._take(n))
        if levels & (_UTF8 | _ASCII):
            return raw.decode("utf-8")
        if levels & _LATIN1:
            return raw.decode("latin-1")
        if levels & _BYTES:
            return raw.decode("latin-1")  # arbitrary bytes: keep them one-to-one
        try:
            return raw.decode(self.native_encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    def _vector(self, sxp: int, levels: int) -> RObject:
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            return RObject(sxp, list(struct.unpack(f">{n}i", self._take(4 * n))))
        if sxp == REALSXP:
            n = self.length()
            return RObject(sxp, list(struct.unpack(f">{n}d", self._take(8 * n))))
        if sxp == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return RObject(sxp, [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)])
        if sxp == STRSXP:
            n = self.length()
            out: list[str | None] = []
            for _ in range(n):
                flags = self.int()
                if flags & 0xFF != CHARSXP:
                    raise RDataError(f"string vector element has type {flags & 0xFF}, not CHARSXP")
                out.append(self._charsxp(flags >> 12))
            return RObject(sxp, out)
        if sxp in (VECSXP, EXPRSXP):
            return RObject(sxp, [self.item() for _ in range(self.length())])
        if sxp == RAWSXP:
            return RObject(sxp, bytes(self._take(self.length())))
        if sxp in (SPECIALSXP, BUILTINSXP):
            return RObject(sxp, bytes(self._take(self.int())).decode("ascii"))
        if sxp == S4SXP:
            return RObject(sxp, None)
        if sxp in (EXTPTRSXP, WEAKREFSXP):
            obj = RObject(sxp, None)
            self.refs.append(obj)
            if sxp == EXTPTRSXP:
                obj.value = (self.item(), self.item())  # protected value, tag
            return obj
        raise RDataError(f"unsupported R SEXPTYPE {sxp} at byte {self.pos}")

    def _pairlist(self, flags: int) -> RObject:
        # Pairlists are read iteratively along CDR so long lists do not exhaust the Python stack.
        head = RObject(flags & 0xFF, [])
        while True:
            attributes = self.item() if flags & _HAS_ATTR else None
            tag = self.item() if flags & _HAS_TAG else None
            if attributes is not None and not head.value:
                head.attributes = self._attributes(attributes)
            head.value.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in _PAIRLIST_TYPES:
                self.pos -= 4
                rest = self.item()
                if rest is not None:  # a dotted pair: keep the tail as a final untagged element
                    head.value.append((None, rest))
                return head

    def _environment(self) -> RObject:
        self.int()  # locked flag
        env = RObject(ENVSXP, {})
        self.refs.append(env)  # before the contents: an environment may contain itself
        self.item()  # enclosing environment: not needed to read data
        frame, hashtab, attributes = self.item(), self.item(), self.item()
        bindings: dict[str, Any] = {}
        if isinstance(frame, RObject):
            bindings.update((k, v) for k, v in frame.value)
        if isinstance(hashtab, RObject) and hashtab.sexptype == VECSXP:
            for bucket in hashtab.value:
                if isinstance(bucket, RObject):
                    bindings.update((k, v) for k, v in bucket.value)
        env.value = bindings
        env.attributes = self._attributes(attributes)
        return env

    def _altrep(self) -> RObject:
        info, state, attributes = self.item(), self.item(), self.item()
        cls = info.value[0][1].name if isinstance(info, RObject) else ""
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(v) for v in state.value[:3])
            kind = INTSXP if cls == "compact_intseq" else REALSXP
            values: list[Any] = [start + i * step for i in range(n)]
            obj = RObject(kind, values if kind == INTSXP else [float(v) for v in values])
        elif cls.startswith("wrap_"):
            obj = state.value[0]  # list(original vector, metadata)
        elif cls == "deferred_string":
            source = state.value[0][1] if state.sexptype == LISTSXP else state.value[0]
            obj = RObject(STRSXP, [_format_number(v) for v in source.value])
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r}")
        obj.attributes = self._attributes(attributes) or obj.attributes
        return obj

    @staticmethod
    def _attributes(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RObject):
            return {}
        return {str(tag): value for tag, value in pairlist.value}


def _format_number(v: float | int) -> str | None:
    if v == NA_INTEGER or v != v:
        return None
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def to_python(obj: Any) -> Any:
    """Convert a read R value to plain Python, recursively.

    Factors become lists of labels, data frames and named lists become dicts (column/element name
    -> value), other vectors become lists (NA as None), NULL becomes None, symbols their name.
    """
    if obj is None or not isinstance(obj, RObject | RSymbol):
        return obj
    if isinstance(obj, RSymbol):
        return obj.name
    if "factor" in obj.classes():
        levels = obj.attributes["levels"].value
        return [None if code == NA_INTEGER else levels[code - 1] for code in obj.value]
    if obj.sexptype in (LGLSXP, INTSXP):
        values: Any = [None if v == NA_INTEGER else v for v in obj.value]
        return (
            [None if v is None else bool(v) for v in values] if obj.sexptype == LGLSXP else values
        )
    if obj.sexptype in (VECSXP, EXPRSXP):
        items = [to_python(v) for v in obj.value]
        names = obj.names()
        return dict(zip(names, items, strict=True)) if names is not None else items
    if obj.sexptype in _PAIRLIST_TYPES:
        return {tag: to_python(value) for tag, value in obj.value}
    return obj.value


def unserialize(data: bytes) -> Any:
    """Read one serialized R object (what ``serialize(x, NULL)`` writes, XDR flavour).

    Args:
        data: the bytes, starting at the ``X\\n`` header, already decompressed.

    Returns:
        An ``RObject``, ``RSymbol`` or None (R's NULL).

    Raises:
        RDataError: on another format, an unsupported type or truncated data.
    """
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (gzip, bzip2, xz or uncompressed serialization)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return unserialize(raw)


def _decompress_lazy_entry(blob: bytes, method: int) -> bytes:
    """Undo R's ``R_compress1/2/3`` framing of one lazy-load entry."""
    size = struct.unpack(">I", blob[:4])[0]
    if method == 1:  # compress = TRUE: zlib, no type byte
        out = zlib.decompress(blob[4:])
    else:  # compress = 2 (bzip2) or 3 (xz): a type byte says what was actually used
        kind, payload = blob[4:5], blob[5:]
        decoders = {b"0": bytes, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}
        if kind not in decoders:
            raise RDataError(f"unknown lazy-load compression type {kind!r}")
        out = decoders[kind](payload)
    if len(out) != size:
        raise RDataError(f"lazy-load entry decompressed to {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``base.rdb`` + ``base.rdx``).

    Args:
        base: path without extension, e.g. ``.../janeaustenr/data/Rdata``.

    Returns:
        Variable name -> unserialized object.

    Raises:
        RDataError: when the index or an entry cannot be read.
    """
    base = Path(base)
    index = read_rds(base.with_suffix(".rdx"))
    parts = dict(zip(index.names() or [], index.value, strict=True))
    compressed = parts.get("compressed")
    method = int(compressed.value[0]) if isinstance(compressed, RObject) else 1
    rdb = base.with_suffix(".rdb").read_bytes()
    variables = parts["variables"]
    out: dict[str, Any] = {}
    for name, where in zip(variables.names() or [], variables.value, strict=True):
        offset, length = (int(v) for v in where.value)
        out[str(name)] = unserialize(_decompress_lazy_entry(rdb[offset : offset + length], method))
    return out
