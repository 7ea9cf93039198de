"""Tensors read one at a time: the lazy mapping every reader returns and the streaming writer.

A conversion of a large checkpoint must never hold the model more than about once. Readers
return `LazyTensors`, a mapping whose shapes and dtypes are known up front (from file headers)
and whose values are read from disk each time they are asked for, never cached; the writers
take one tensor at a time. Plain dicts of arrays work wherever `LazyTensors` do.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from convert.rules import ConversionError
from whisper_io.messages import first_line


@dataclasses.dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    source: str  # the file it comes from, for messages
    # index (a tuple of slices) -> that part only, for files stored in chunks smaller than the
    # array (a Flax checkpoint's); None: `read` it whole.
    read_region: Callable[[tuple], np.ndarray] | None = None


class LazyTensors(Mapping):
    """name -> array, read from its file when asked (never cached); shapes and dtypes up front.

    Tensors sliced out of a Flax state's layer stacks keep those in `stacks` (dotted Flax path ->
    the whole stacked array, in the model's layout), so going back to Flax takes each stack as it
    is instead of stacking its layers again."""

    def __init__(self, specs: Mapping[str, Spec], stacks: Mapping | None = None):
        self._specs = dict(specs)
        self.stacks = stacks

    def __getitem__(self, key: str) -> np.ndarray:
        spec = self._specs[key]
        array = spec.read()
        if tuple(array.shape) != spec.shape:
            raise ConversionError(f"{spec.source}: {key} holds {tuple(array.shape)}, its header says {spec.shape}")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, key: str) -> Spec:
        return self._specs[key]

    def source(self, key: str) -> str:
        return self._specs[key].source

    def without(self, *keys: str) -> LazyTensors:
        if not keys:
            return self
        return LazyTensors({k: v for k, v in self._specs.items() if k not in keys}, self.stacks)

    def renamed(self, to: Callable[[str], str | None], what: str) -> LazyTensors:
        """The same tensors under the names `to` gives; a name it does not know is an error."""
        from convert.rules import rename

        return LazyTensors(rename(self._specs, to, what))

    def cast(self, dtype) -> LazyTensors:
        """The tensors converted to `dtype` as they are read."""
        dtype = np.dtype(dtype)

        def reader(spec: Spec):
            return lambda: np.asarray(spec.read()).astype(dtype, copy=False)

        return LazyTensors({k: dataclasses.replace(s, dtype=dtype, read=reader(s)) for k, s in self._specs.items()})


def shape_of(tensors: Mapping, key: str) -> tuple[int, ...]:
    return tensors.spec(key).shape if isinstance(tensors, LazyTensors) else tuple(np.shape(tensors[key]))


def dtype_of(tensors: Mapping, key: str) -> np.dtype:
    if isinstance(tensors, LazyTensors):
        return tensors.spec(key).dtype
    value = tensors[key]
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def shapes_of(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    return {key: shape_of(tensors, key) for key in tensors}


def renamed(tensors: Mapping, to: Callable[[str], str | None], what: str) -> Mapping:
    """`tensors` under the names `to` gives (lazily for `LazyTensors`); unknown names are an error."""
    if isinstance(tensors, LazyTensors):
        return tensors.renamed(to, what)
    from convert.rules import rename

    return rename(tensors, to, what)


def ml_dtypes_name(name: str) -> np.dtype:
    """A NumPy dtype by name, bfloat16 included."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def cast(tensors: Mapping, dtype) -> Mapping:
    """`tensors` converted to `dtype` (lazily for `LazyTensors`)."""
    if isinstance(tensors, LazyTensors):
        return tensors.cast(dtype)
    return {k: np.asarray(v).astype(dtype, copy=False) for k, v in tensors.items()}


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_NON_FLOAT = {
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}  # fmt: skip


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    return np.dtype(SAFETENSORS_DTYPES.get(name) or _NON_FLOAT.get(name) or name.lower())


def safetensors_tensors(files: list[Path]) -> LazyTensors:
    """The tensors of one or more safetensors files, each read from the file when asked for
    (`np.fromfile` at its offset: nothing memory-mapped stays resident). A damaged or truncated
    file, or a tensor in two files, is one error naming the file."""
    specs: dict[str, Spec] = {}
    for path in files:
        for key, (shape, dtype, offset) in _safetensors_header(path).items():
            if key in specs:
                raise ConversionError(f"{path}: tensor {key} is also in {specs[key].source}")

            def read(path=path, shape=shape, dtype=dtype, offset=offset, key=key):
                count = int(np.prod(shape))
                try:
                    array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
                except (OSError, ValueError) as err:
                    raise ConversionError(f"{path}: cannot read {key} ({first_line(err)})") from None
                if array.size != count:
                    raise ConversionError(f"{path}: {key} is truncated")
                return array.reshape(shape)

            specs[key] = Spec(shape, dtype, read, str(path))
    return LazyTensors(specs)


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """name -> (shape, dtype, absolute data offset), checked against the file's size."""

    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path}: not a readable safetensors file ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"a header of {length} bytes in a file of {size}")
            header = json.loads(file.read(length))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise bad(f"the header is not JSON: {first_line(err)}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    start, found = 8 + length, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"the entry of {key} is malformed") from None
        if dtype not in SAFETENSORS_DTYPES and dtype not in _NON_FLOAT:
            raise bad(f"{key} has an unknown dtype {dtype!r}")
        dtype = _numpy_dtype(dtype)
        if not (0 <= begin <= end and start + end <= size):
            raise bad(f"{key} lies beyond the end of the file (truncated?)")
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise bad(f"{key}: {end - begin} bytes do not hold {shape} of {dtype.name}")
        found[key] = (shape, dtype, start + begin)
    return found


def write_safetensors(path: Path, tensors: Mapping, keys=None, metadata: dict | None = None) -> None:
    """Write `keys` of `tensors` (default: all) as one safetensors file, one tensor at a time, in
    the order given: the order a lazy reader is cheapest in (a flax checkpoint's layers of one
    stack follow each other)."""
    keys = list(tensors if keys is None else keys)
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key in keys:
        dtype, shape = np.dtype(dtype_of(tensors, key)), shape_of(tensors, key)
        if dtype.name not in names:
            raise ConversionError(f"{key}: {dtype.name} tensors are not written (floating point only)")
        size = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": names[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for key in keys:
            array = np.ascontiguousarray(tensors[key], dtype=np.dtype(dtype_of(tensors, key)))
            out.write(memoryview(array.reshape(-1).view(np.uint8)))
