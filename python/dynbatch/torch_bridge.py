"""Between torch/numpy leaves and the core's raw descriptors (address, shape, dtype)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack

from . import _core
from .errors import InvalidSampleError, UnsupportedLeafError
from .padding import PaddedBatch, pad_element_bytes, padded_length
from .structure import NestingTooDeep, TreeDef, flatten, structure_mismatch, unflatten

__all__ = ["LeafSpec", "Schema", "split_outputs", "stack_small", "stacks_small", "storage_of"]

# torch dtype -> DLPack (type code, bits). Lanes are always 1.
_DLPACK_TYPES: dict[torch.dtype, tuple[int, int]] = {
    torch.bool: (6, 8),
    torch.uint8: (1, 8),
    torch.int8: (0, 8),
    torch.int16: (0, 16),
    torch.int32: (0, 32),
    torch.int64: (0, 64),
    torch.float16: (2, 16),
    torch.bfloat16: (4, 16),
    torch.float32: (2, 32),
    torch.float64: (2, 64),
    torch.complex64: (5, 64),
    torch.complex128: (5, 128),
}

# Python numbers batch as default_collate makes them: float64, int64, bool.
_NUMBER_DTYPES: dict[type, torch.dtype] = {
    bool: torch.bool,
    int: torch.int64,
    float: torch.float64,
}

TENSOR = "tensor"
NUMBER = "number"


def _numpy() -> Any:
    """numpy if the caller's process already imported it (a numpy leaf implies it did)."""
    return sys.modules.get("numpy")


def _is_numpy_leaf(value: object) -> bool:
    np = _numpy()
    return np is not None and isinstance(value, (np.ndarray, np.generic))


_numpy_dtype_cache: dict[Any, torch.dtype] = {}


def _torch_dtype_of_numpy(array: Any) -> torch.dtype | None:
    dtype = array.dtype
    cached = _numpy_dtype_cache.get(dtype)
    if cached is None:
        np = _numpy()
        try:
            cached = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        except (TypeError, ValueError):  # object dtypes; non-native byte order
            return None
        _numpy_dtype_cache[dtype] = cached
    return cached


@dataclass(frozen=True)
class LeafSpec:
    """What every sample's leaf at ``path`` must be for the stream to batch."""

    path: str
    kind: str  # TENSOR (goes through the core) or NUMBER (stacked in Python)
    dtype: torch.dtype
    shape: tuple[int, ...]  # a padded leaf: (-1, *the rest)
    core_index: int  # position among the core's leaves; -1 for numbers
    pad: bytes | None = None  # a padded leaf: one element of the pad value

    def core_descriptor(self) -> _core.LeafDescriptor:
        code, bits = _DLPACK_TYPES[self.dtype]
        if self.pad is not None:
            return (list(self.shape), code, bits, 1, self.pad)
        return (list(self.shape), code, bits, 1)


class Schema:
    """The first sample's structure and leaf specs, against which later samples are checked.

    ``admit`` converts one sample into what must be kept alive until it is collated (the
    contiguous host leaves and the numbers) plus the addresses the core copies from.
    """

    def __init__(
        self,
        first_sample: Any,
        first_index: int = 0,
        *,
        pad_value: float | None = None,
        pad_multiple: int = 1,
        max_tokens: int = 0,
    ) -> None:
        self.pad_multiple = pad_multiple
        self.max_tokens = max_tokens  # padding: a sample whose padded length exceeds it fails
        leaves: list[Any] = []
        try:
            self.treedef: TreeDef = flatten(first_sample, leaves)
        except NestingTooDeep as error:
            raise InvalidSampleError(first_index, "", str(error)) from None
        self.first_index = first_index
        paths = self.treedef.leaf_paths()
        specs: list[LeafSpec] = []
        core_index = 0
        for path, leaf in zip(paths, leaves, strict=True):
            spec = _spec_of(first_index, path, leaf, core_index)
            if spec.kind == TENSOR:
                core_index += 1
                if pad_value is not None and spec.shape:  # padding mode: dim 0 may vary
                    spec = LeafSpec(
                        path,
                        TENSOR,
                        spec.dtype,
                        (-1, *spec.shape[1:]),
                        spec.core_index,
                        pad_element_bytes(pad_value, spec.dtype, path),
                    )
            specs.append(spec)
        self.leaves: tuple[LeafSpec, ...] = tuple(specs)
        self.padded = [i for i, spec in enumerate(specs) if spec.pad is not None]
        if pad_value is not None and not self.padded:
            raise InvalidSampleError(
                first_index,
                "",
                "collate='pad' needs a tensor leaf with a first dimension to pad; this sample "
                "has none",
            )
        self.single_tensor = self.treedef.kind == "leaf" and specs[0].kind == TENSOR
        # A lone real tensor is by far the most common sample: it skips the generic walk
        # (complex ones may carry a lazy conjugate, which the generic walk resolves).
        real = self.single_tensor and not specs[0].dtype.is_complex
        self.fast_path = real and not self.padded
        # A lone variable-length tensor skips the generic walk too.
        self.padded_fast_path = real and bool(self.padded)

    def core_descriptors(self) -> list[_core.LeafDescriptor]:
        return [spec.core_descriptor() for spec in self.leaves if spec.kind == TENSOR]

    def admit(
        self, sample: Any, index: int, addresses: list[int], lengths: list[int] | None = None
    ) -> Any:
        """Checks ``sample``, appends its core addresses (and, padding, its length to
        ``lengths``), returns what must stay alive."""
        if self.fast_path and type(sample) is torch.Tensor:
            spec = self.leaves[0]
            if (
                sample.dtype is spec.dtype
                and sample.shape == spec.shape
                and sample.is_cpu
                and sample.layout is torch.strided  # first: a sparse one raises in the next
                and sample.is_contiguous()
                and not sample.is_neg()
            ):
                addresses.append(sample.data_ptr())
                return sample
        if self.padded_fast_path and type(sample) is torch.Tensor and lengths is not None:
            spec = self.leaves[0]
            shape = sample.shape
            if (
                sample.dtype is spec.dtype
                and len(shape) == len(spec.shape)
                and shape[1:] == spec.shape[1:]
                and sample.is_cpu
                and sample.layout is torch.strided  # first: a sparse one raises in the next
                and sample.is_contiguous()
                and not sample.is_neg()
                and (
                    not self.max_tokens
                    or padded_length(shape[0], self.pad_multiple) <= self.max_tokens
                )
            ):
                addresses.append(sample.data_ptr())
                lengths.append(shape[0])
                return sample
        leaves: list[Any] = []
        try:
            treedef = flatten(sample, leaves)
        except NestingTooDeep as error:
            raise InvalidSampleError(index, "", str(error)) from None
        if treedef != self.treedef:
            raise structure_mismatch(index, self.treedef, treedef, self.first_index)
        kept: list[Any] = []
        own_addresses: list[int] = []  # joins `addresses` only once the whole sample passed
        length: int | None = None
        for spec, leaf in zip(self.leaves, leaves, strict=True):
            if spec.kind == NUMBER:
                kept.append(_check_number(spec, leaf, index, self.first_index))
                continue
            host = _host_leaf(index, spec.path, leaf)
            _check_tensor(spec, host, index, self.first_index)
            if spec.pad is not None:
                length = _check_length(spec, host, index, length)
            own_addresses.append(_address_of(host))
            kept.append(host)
        if length is not None and self.max_tokens:
            padded = padded_length(length, self.pad_multiple)
            if padded > self.max_tokens:
                raise InvalidSampleError(
                    index,
                    self.leaves[self.padded[0]].path,
                    f"length {length} (padded to {padded}) exceeds max_tokens "
                    f"{self.max_tokens}: not even a batch of this sample alone fits",
                )
        addresses.extend(own_addresses)
        if lengths is not None and length is not None:
            lengths.append(length)
        return kept[0] if self.single_tensor else kept

    def batch_leaves(
        self, batch: _core.Batch, kept: list[Any], rows: list[int] | None = None
    ) -> list[Any]:
        """The batch's leaves in flatten order: core leaves as tensors over the staging
        buffer, number leaves stacked from ``kept`` (what ``admit`` returned, in order).
        With ``rows``, only those rows of the batch (``kept`` holds just their samples)."""
        index = None if rows is None else torch.tensor(rows, dtype=torch.int64)
        leaves: list[Any] = []
        for position, spec in enumerate(self.leaves):
            if spec.kind == NUMBER:
                leaves.append(torch.tensor([k[position] for k in kept], dtype=spec.dtype))
                continue
            leaf = from_dlpack(batch.leaf(spec.core_index))
            leaves.append(leaf if index is None else leaf.index_select(0, index))
        if self.padded:  # lengths and ids travel as two more leaves: slicing keeps them in step
            for extra in (batch.lengths, batch.ids):
                values = torch.tensor(extra, dtype=torch.int64)
                leaves.append(values if index is None else values.index_select(0, index))
        return leaves

    def structure(self, leaves: list[Any]) -> Any:
        """Batch leaves put back into the samples' structure (padding: a PaddedBatch)."""
        if self.padded:
            data = leaves[0] if self.single_tensor else unflatten(self.treedef, leaves[:-2])
            return PaddedBatch(data, leaves[-2], leaves[-1], int(leaves[self.padded[0]].shape[1]))
        if self.single_tensor:
            return leaves[0]
        return unflatten(self.treedef, leaves)


# Lone CPU tensors up to this size are stacked by torch on the caller's thread: checking a
# sample and handing its address to the core (~0.5 us of Python) costs more than copying it.
_STACK_BELOW_BYTES = 16 * 1024


def stacks_small(first: Any) -> bool:
    """Whether samples like ``first`` (a lone tensor) are stacked by torch rather than copied
    by the core: real, on the CPU, strided, and small."""
    return (
        type(first) is torch.Tensor
        and first.is_cpu
        and first.layout is torch.strided
        and not first.dtype.is_complex
        and first.nbytes <= _STACK_BELOW_BYTES
    )


def stack_small(samples: Sequence[Any], dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """``torch.stack(samples)`` when torch can stack them as they are: one native call checks
    shapes and devices; the dtype, which torch would promote silently, is checked here. None
    otherwise (not all tensors, mixed dtypes or devices, requiring grad...): the caller then
    takes the checked path, which names what is wrong."""
    try:
        if not _core.attributes_are(samples, "dtype", dtype):  # one native call
            return None
        stacked = torch.stack(samples)  # type: ignore[arg-type]
    except (AttributeError, RuntimeError, TypeError):
        return None
    if stacked.shape[1:] != shape or stacked.requires_grad:
        return None
    return stacked


def storage_of(kept: Any) -> Any:
    """What keeps a sample's memory alive until the core has copied it (``kept``: what
    ``Schema.admit`` returned): a tensor's storage rather than the tensor, whose storage the
    caller may swap (``x.set_()``) meanwhile. Number leaves stay as they are."""
    if isinstance(kept, torch.Tensor):
        return kept.untyped_storage()
    if isinstance(kept, list):
        return [k.untyped_storage() if isinstance(k, torch.Tensor) else k for k in kept]
    return kept


def split_outputs(output: Any, size: int) -> list[Any]:
    """Per-sample results from a model's batched output (a tensor, or dicts, tuples and lists
    nesting tensors), split along the first dimension."""
    leaves: list[Any] = []
    try:
        treedef = flatten(output, leaves)
    except NestingTooDeep as error:
        raise ValueError(f"model output: {error}") from None
    columns: list[Any] = []
    for path, leaf in zip(treedef.leaf_paths(), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            got = "a 0-d tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise ValueError(
                f"model output{path or ''} must be a tensor with a batch dimension, got {got}"
            )
        if leaf.shape[0] != size:
            raise ValueError(
                f"model output{path or ''} has {leaf.shape[0]} rows for a batch of {size} samples"
            )
        columns.append(leaf.unbind(0))
    if treedef.kind == "leaf":
        return list(columns[0])
    return [unflatten(treedef, [column[i] for column in columns]) for i in range(size)]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_int_range(leaf: Any, index: int, path: str) -> None:
    if type(leaf) is int and not _INT64_MIN <= leaf <= _INT64_MAX:
        raise InvalidSampleError(index, path, f"the int {leaf} does not fit in int64")


def _spec_of(index: int, path: str, leaf: Any, core_index: int) -> LeafSpec:
    if type(leaf) in _NUMBER_DTYPES:
        _check_int_range(leaf, index, path)
        return LeafSpec(path, NUMBER, _NUMBER_DTYPES[type(leaf)], (), -1)
    host = _host_leaf(index, path, leaf)
    dtype = _dtype_of(host)
    if dtype not in _DLPACK_TYPES:
        raise UnsupportedLeafError(index, path, f"dtype {dtype} cannot be batched")
    return LeafSpec(path, TENSOR, dtype, tuple(host.shape), core_index)


def _host_leaf(index: int, path: str, leaf: Any) -> Any:
    """A contiguous CPU tensor or numpy array holding the leaf's data, or a clear error."""
    if isinstance(leaf, torch.Tensor):
        if leaf.device.type != "cpu":
            raise UnsupportedLeafError(
                index,
                path,
                f"a tensor on {leaf.device}: batches are collated from host (CPU) memory; "
                "move the sample to the CPU first",
            )
        if leaf.is_sparse or leaf.layout != torch.strided:
            raise UnsupportedLeafError(index, path, f"a {leaf.layout} tensor cannot be stacked")
        if leaf.is_conj() or leaf.is_neg():  # lazy views: data_ptr() holds the unresolved values
            leaf = leaf.resolve_conj().resolve_neg()
        return leaf if leaf.is_contiguous() else leaf.contiguous()
    if _is_numpy_leaf(leaf):
        np = _numpy()
        array = np.asarray(leaf)  # ascontiguousarray would turn a scalar into shape (1,)
        if not array.dtype.isnative:  # big-endian data from a file: swap once, here
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        if _torch_dtype_of_numpy(array) is None:
            raise UnsupportedLeafError(
                index, path, f"a numpy array of dtype {array.dtype} cannot be batched"
            )
        return array
    raise UnsupportedLeafError(
        index,
        path,
        f"a {type(leaf).__name__} cannot be batched; leaves must be torch tensors, numpy "
        "arrays or Python numbers",
    )


def _dtype_of(host: Any) -> torch.dtype:
    if isinstance(host, torch.Tensor):
        return host.dtype
    dtype = _torch_dtype_of_numpy(host)
    assert dtype is not None
    return dtype


def _address_of(host: Any) -> int:
    if isinstance(host, torch.Tensor):
        return int(host.data_ptr())
    return int(host.__array_interface__["data"][0])


def _check_length(spec: LeafSpec, host: Any, index: int, length: int | None) -> int:
    """A padded leaf's length; every padded leaf of one sample must have the same."""
    own = int(host.shape[0])
    if length is not None and own != length:
        raise InvalidSampleError(
            index,
            spec.path,
            f"length {own} differs from {length}, the length of this sample's other padded "
            "leaves; the padded leaves of one sample must share their first dimension",
        )
    if own >= 2**32:
        raise InvalidSampleError(index, spec.path, f"length {own} is too long to pad")
    return own


def _check_tensor(spec: LeafSpec, host: Any, index: int, first_index: int) -> None:
    dtype = _dtype_of(host)
    if dtype != spec.dtype:
        raise InvalidSampleError(
            index,
            spec.path,
            f"dtype {dtype} differs from {spec.dtype} of sample {first_index}; "
            "samples of one stream must share leaf dtypes",
        )
    shape = tuple(host.shape)
    if spec.pad is not None and len(shape) == len(spec.shape) and shape[1:] == spec.shape[1:]:
        return  # padding: only the first dimension may differ
    if shape != spec.shape:
        raise InvalidSampleError(
            index,
            spec.path,
            f"shape {shape} differs from {spec.shape} of sample {first_index}; "
            + (
                "padding: only the first dimension may differ"
                if spec.pad is not None
                else "samples of one stream must share leaf shapes"
                + (
                    "; for sequences of different lengths use collate='pad'"
                    if len(shape) == len(spec.shape) and shape[1:] == spec.shape[1:]
                    else ""
                )
            ),
        )


_NUMBER_NAMES = {torch.bool: "bool", torch.int64: "int", torch.float64: "float"}


def _check_number(spec: LeafSpec, leaf: Any, index: int, first_index: int) -> Any:
    kind = type(leaf)
    if kind in _NUMBER_DTYPES:
        if _NUMBER_DTYPES[kind] == spec.dtype or (spec.dtype == torch.float64 and kind is int):
            _check_int_range(leaf, index, spec.path)
            return leaf
    else:
        _host_leaf(index, spec.path, leaf)  # a leaf that can never batch says so
    raise InvalidSampleError(
        index,
        spec.path,
        f"a {kind.__name__} where sample {first_index} has a Python {_NUMBER_NAMES[spec.dtype]}",
    )
