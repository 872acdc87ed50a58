"""Where Hugging Face tensors come from: a live state dict, or a safetensors folder read lazily.

A source answers ``names()``, ``shape(name)`` and ``dtype(name)`` without reading data, and
``get(name)`` one tensor at a time, so a converter checks every name and shape before reading anything and
never holds a second copy of a large checkpoint.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype codes of the floating formats a model can be converted from
DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CONVERTIBLE = frozenset(DTYPES.values())
# Other codes torch reads: named in the refusal (quantized or integer data, never cast silently).
OTHER_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class StateDictSource:
    """Tensors of an in-memory model (a transformers model's ``state_dict()``)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> set[str]:
        return set(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def close(self) -> None:
        pass


class SafetensorsFolder:
    """The ``*.safetensors`` files of a folder: one ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json`` (or, without an index, every ``*.safetensors`` file).

    Files are opened with ``safe_open`` (memory-mapped); ``get`` reads one tensor.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        try:
            for path in self._files():
                handle = self._open(path)
                stored = handle.keys()  # a safe_open handle is not iterable
                for name in stored:
                    if name in self._where:
                        raise ValueError(f"{self.folder}: tensor {name!r} appears in more than one file")
                    self._where[name] = handle
        except BaseException:
            self.close()
            raise

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are not in the folder: {missing}")
            return files
        if (self.folder / SINGLE_NAME).is_file():
            return [self.folder / SINGLE_NAME]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {self.folder}")
        return files

    def _open(self, path: Path):
        try:
            return self._stack.enter_context(safe_open(str(path), framework="pt"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._where[name].get_slice(name).get_dtype()
        if code not in DTYPES and code not in OTHER_DTYPES:
            raise ValueError(f"{self.folder}: tensor {name!r} is stored as {code}; only {sorted(DTYPES)} "
                             "checkpoints can be converted (dequantize first)")
        return DTYPES.get(code) or OTHER_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._where[name].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{self.folder}: cannot read tensor {name!r}: {e}") from e

    def close(self) -> None:
        self._stack.close()
