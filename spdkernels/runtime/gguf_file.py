"""A GGUF file's metadata and tensor table, read in one pass with every count and length checked against the file.

The ``gguf`` package's reader builds a numpy view per metadata value (two per string), ~4 s for the embedded
SmolLM2's 49152 tokens and 48900 merges; this walk decodes them straight from a memory map (~0.1 s) and refuses a
count or length past the end of the file before reading it (an array claiming 10**12 elements made that reader loop
with memory growing). Tensor data stays in the file: each tensor is a numpy view of a read-only memory map, in the
layout ``gguf.quants.dequantize`` takes (quantised types as rows of block bytes).

Format (little-endian, or all of it byte-swapped, as llama.cpp writes for big-endian hosts; version 2 and 3): magic
``GGUF``, u32 version, u64 tensor count, u64 metadata count; each metadata entry a string key, a u32 value type and
the value (strings: u64 length + UTF-8 bytes; arrays: u32 element type, u64 count, the elements); each tensor a
string name, u32 dimension count, u64 dimensions (innermost first), u32 ggml type, u64 offset into the data section,
which starts at the next multiple of ``general.alignment`` (32)."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

# value type -> (struct code, numpy dtype) of the fixed-size types; 8 = string, 9 = array
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
            12: ("d", np.float64)}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 8
_MAX_DIMS = 4  # GGML_MAX_DIMS
# ggml types stored as plain numbers (the others are blocks of bytes)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFFormatError(ValueError):
    """A file that is not a readable GGUF file: the message says where and why."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: int  # ggml type (gguf.GGMLQuantizationType's value)
    shape: Tuple[int, ...]  # GGUF order: innermost dimension first
    data: np.ndarray  # rows reversed from ``shape``; quantised types as uint8 block bytes per row


@dataclass
class GGUFFile:
    path: Path
    version: int
    byte_order: str  # "<" (little-endian) or ">" (a byte-swapped file)
    fields: Dict[str, Any]  # metadata key -> int / float / bool / str, or a list of them (lists of lists)
    tensors: List[GGUFTensor]


def read_gguf(path) -> GGUFFile:
    """The metadata and tensor table of the GGUF file ``path``; :class:`GGUFFormatError` for a file that is not one,
    is truncated, or holds a count, length, type or offset that does not fit it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{p} is not a GGUF file (no GGUF header)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise GGUFFormatError(f"{p} is not a GGUF file (no GGUF header)")
        (version,) = struct.unpack_from("<I", mm, 4)
        e = "<"
        if version & 0xFFFF == 0:  # a byte-swapped file (its version reads as v << 24)
            e = ">"
            (version,) = struct.unpack_from(">I", mm, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{p}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = struct.unpack_from(e + "QQ", mm, 8)
        pos = 24

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise GGUFFormatError(f"{p} is truncated or corrupt ({what} needs {n} bytes at offset {pos}, "
                                      f"the file has {size})")

        def scalar(code: str, what: str):
            nonlocal pos
            k = struct.calcsize(e + code)
            need(k, what)
            (v,) = struct.unpack_from(e + code, mm, pos)
            pos += k
            return v

        def string(what: str) -> str:
            nonlocal pos
            n = scalar("Q", f"{what}'s length")
            need(n, what)
            try:
                s = mm[pos:pos + n].decode("utf-8")
            except UnicodeDecodeError as err:  # (replacing the bytes would merge two damaged tokens into one)
                raise GGUFFormatError(f"{p}: {what} at offset {pos} is not UTF-8 ({err.reason})") from None
            pos += n
            return s

        def value(t: int, depth: int = 0) -> Any:
            nonlocal pos
            if t in _SCALARS:
                return scalar(_SCALARS[t][0], "a value")
            if t == _STRING:
                return string("a string")
            if t != _ARRAY:
                raise GGUFFormatError(f"{p} has a metadata value of unknown type {t} at offset {pos}")
            et, count = scalar("I", "an array type"), scalar("Q", "an array length")
            if et in _SCALARS:
                dt = np.dtype(_SCALARS[et][1]).newbyteorder(e)
                need(count * dt.itemsize, f"an array of {count} values")
                arr = np.frombuffer(mm, dtype=dt, count=count, offset=pos)
                out = arr.tolist()
                del arr  # (no view of the map may outlive it)
                pos += count * dt.itemsize
                return out
            if et == _STRING:
                need(count * 8, f"an array of {count} strings")  # a length each, at least
                return [string("a string") for _ in range(count)]
            if et == _ARRAY and depth < _MAX_NESTING:
                need(count * 12, f"an array of {count} arrays")  # a type and a count each, at least
                return [value(_ARRAY, depth + 1) for _ in range(count)]
            raise GGUFFormatError(f"{p} has a metadata array of unknown or too deeply nested type {et}")

        need(n_kv * 12, f"{n_kv} metadata entries")  # (a key length and a type each, at least)
        need(n_tensors * 24, f"{n_tensors} tensor descriptions")
        fields: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = string("a metadata key")
            if key in fields:
                raise GGUFFormatError(f"{p}: metadata key {key!r} appears twice")
            fields[key] = value(scalar("I", "a value type"))
        infos = []
        for _ in range(n_tensors):
            name = string("a tensor name")
            nd = scalar("I", "a dimension count")
            if not 1 <= nd <= _MAX_DIMS:
                raise GGUFFormatError(f"{p}: tensor {name} has {nd} dimensions (1 to {_MAX_DIMS} expected)")
            need(8 * nd, "the dimensions")
            dims = struct.unpack_from(f"{e}{nd}Q", mm, pos)
            pos += 8 * nd
            infos.append((name, dims, scalar("I", "a tensor type"), scalar("Q", "a tensor offset")))
        align = fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise GGUFFormatError(f"{p}: general.alignment {align!r} is not a power of two")
        start = -(-pos // align) * align

    tensors, seen = [], set()
    whole = np.memmap(p, dtype=np.uint8, mode="r") if infos else None
    for name, dims, t, off in infos:
        if name in seen:
            raise GGUFFormatError(f"{p}: tensor {name} appears twice")
        seen.add(name)
        try:
            qt = GGMLQuantizationType(t)
            block, type_size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{p}: tensor {name} has unknown ggml type {t}") from None
        n = 1
        for d in dims:
            n *= d
        rows = tuple(reversed(dims))
        if dims[0] % block:
            raise GGUFFormatError(f"{p}: tensor {name}'s rows of {dims[0]} are not whole blocks of {block}")
        n_bytes = n // block * type_size
        at = start + off
        if off % align or at + n_bytes > size:
            raise GGUFFormatError(f"{p} is truncated or corrupt (tensor {name}: {n_bytes} bytes at offset {at}, "
                                  f"the file has {size})")
        raw = whole[at:at + n_bytes]
        if t in _PLAIN:
            data = raw.view(np.dtype(_PLAIN[t]).newbyteorder(e)).reshape(rows)
            if e == ">":  # in this machine's byte order (a copy): readers view the bytes as native numbers
                data = data.astype(data.dtype.newbyteorder("="))
        elif e == ">":  # (the blocks' fp16 scales are byte-swapped too: dequantize would read them wrong)
            raise GGUFFormatError(f"{p}: tensor {name} is quantised ({qt.name}) in a byte-swapped file: not supported")
        else:
            data = raw.reshape(*rows[:-1], rows[-1] // block * type_size)
        tensors.append(GGUFTensor(name, t, tuple(dims), data))
    return GGUFFile(p, version, e, fields, tensors)
