"""The tensors of a PyTorch zip checkpoint (what `torch.save` writes), read lazily and without torch.

A `.pt` file is a zip archive: `ARCHIVE/data.pkl` pickles the object, and each tensor's storage
is a separate, uncompressed member `ARCHIVE/data/KEY`. The pickle is read by an unpickler that
resolves nothing but tensor rebuilding, storage types and ordered dicts (anything else is
refused by name, so a file from the internet cannot run code), and each tensor comes back as a
`Spec`: its shape and dtype now, its values read from the archive only when asked for. A
checkpoint is therefore converted one tensor at a time, never held whole.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from convert.rules import ConversionError
from convert.tensors import Spec

# torch's legacy storage type names -> NumPy dtypes (bfloat16 through ml_dtypes).
STORAGES = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "ByteStorage": "uint8",
    "CharStorage": "int8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class Refused(Exception):
    """The pickle references something other than tensors and plain containers."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _StorageType:
    def __init__(self, dtype: str):
        import ml_dtypes

        self.dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


class _Storage:
    def __init__(self, reader, key: str, dtype: np.dtype, numel: int):
        self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> Spec:
    shape, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def read() -> np.ndarray:
        flat = storage.reader.storage(storage.key, storage.dtype, storage.numel)
        if not shape:
            return flat[offset].copy()
        count = int(np.prod(shape))
        if offset == 0 and count == flat.size and stride == _contiguous_strides(shape):
            return flat.reshape(shape)  # the whole storage, in order: no copy
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape, tuple(s * storage.dtype.itemsize for s in stride), writeable=False
        )
        return np.array(view)  # a contiguous copy of this tensor only

    return Spec(shape, storage.dtype, read, f"{storage.reader.path}:{storage.key}")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _rebuild_parameter(data, requires_grad=None, hooks=None, *_ignored):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, reader):
        super().__init__(file)
        self.reader = reader

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name in STORAGES:
            return _StorageType(STORAGES[name])
        raise Refused(name if module in ("builtins", "__builtin__") else f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        return _Storage(self.reader, str(key), storage_type.dtype, int(numel))


class PtReader:
    """Reads storages from the archive on demand, straight from the file into an array (torch
    stores them uncompressed), one at a time."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = path, prefix
        self._members: dict[str, zipfile.ZipInfo] | None = None

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        with open(self.path, "rb") as file:  # the local header's own name and extra-field lengths
            file.seek(info.header_offset)
            header = file.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise ConversionError(f"{self.path}: damaged zip entry {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length

    def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self.prefix}/data/{key}"
        try:
            if self._members is None:
                with zipfile.ZipFile(self.path) as archive:
                    self._members = {info.filename: info for info in archive.infolist()}
            info = self._members[name]
            if info.file_size < numel * dtype.itemsize:
                raise ConversionError(f"{self.path}: tensor storage {name} is truncated")
            if info.compress_type != zipfile.ZIP_STORED:  # not what torch writes, but readable
                with zipfile.ZipFile(self.path) as archive:
                    return np.frombuffer(archive.read(name), dtype, count=numel).copy()
            flat = np.fromfile(self.path, dtype=dtype, count=numel, offset=self._data_offset(info))
        except (KeyError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise ConversionError(f"{self.path}: cannot read tensor storage {name} ({err})") from None
        if flat.size < numel:
            raise ConversionError(f"{self.path}: tensor storage {name} is truncated")
        return flat


def read_pt(path: Path):
    """The object a `torch.save` zip file holds, its tensors as lazy `Spec`s.

    Raises `Refused` (naming the reference) for anything but tensors and plain containers, and
    `ConversionError` for a damaged file."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise ConversionError(f"{path}: not a readable PyTorch checkpoint (no data.pkl in the archive)")
            prefix = pickles[0].split("/")[0]
            order = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() else ""
            if order not in ("", "little"):
                raise ConversionError(f"{path}: a {order}-endian checkpoint; only little-endian files are read")
            with archive.open(pickles[0]) as file:
                return _Unpickler(file, PtReader(path, prefix)).load()
    except (Refused, ConversionError):
        raise
    except Exception as err:  # a damaged pickle makes the unpickler raise almost anything
        from whisper_io.messages import first_line

        message = first_line(err) or type(err).__name__
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({message})") from None
