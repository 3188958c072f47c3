"""``SparseLinear``, a drop-in ``nn.Linear`` whose weight is pruned by a mask and stored in
a sparse format (``masked``, ``bitmap``, ``2:4``: see :mod:`multiflow_kernels.formats`), and
the tools to turn a pruned model into one: ``sparsify`` (also ``format="auto"``),
``save_sparse`` / ``load_sparse``, ``memory_report``.
"""
from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import formats
from ._io import atomic_write
from .formats import FORMATS

__all__ = ["SparseLinear", "sparsify", "save_sparse", "load_sparse", "memory_report", "FORMATS"]

_META_KEY = "multiflow_kernels"
# 2: the bitmap format's row_ptr became int32 and its block_ptr lost the column of block 0
# (always 0); version 1 files with bitmap layers cannot be loaded.
_FORMAT_VERSION = 2


def _size(name: str, value) -> int:
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"SparseLinear: {name} must be an int, got {type(value).__name__}") from None
    if size < 0:
        raise ValueError(f"SparseLinear: {name} must be >= 0, got {size}")
    return size


class SparseLinear(nn.Module):
    """``y = x @ (W * M).T + b`` with the weight stored in a sparse ``format``.

    Build one with :meth:`from_dense`; the constructor makes an empty layer of the right
    shapes (what :func:`load_sparse` and ``load_state_dict`` fill). ``masked`` keeps a
    trainable ``weight`` parameter; ``bitmap`` and ``2:4`` keep only buffers (inference), but
    gradients still flow through them to ``x`` and the bias (csrc/linear_autograd.cpp).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "bitmap",
                 device=None, dtype=None):
        super().__init__()
        self.format = formats.check_format(format)
        self.in_features = _size("in_features", in_features)
        self.out_features = _size("out_features", out_features)
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"SparseLinear: dtype must be float32, float16 or bfloat16, got {dtype}")
        for name, t in formats.empty(self.format, self.out_features, self.in_features,
                                     device=device, dtype=dtype).items():
            if name == "weight":
                self.weight = nn.Parameter(t)
            else:
                self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor, format: str = "bitmap") -> "SparseLinear":
        """The sparse twin of ``linear`` keeping the weights where ``mask`` is True, in ``format``
        (default ``bitmap``, compressed for inference; ``masked`` for sparse fine-tuning).
        ``format="2:4"`` needs a 2:4 mask (ValueError naming the rows otherwise)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_dense needs an nn.Linear, got {type(linear).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(linear.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight's {tuple(linear.weight.shape)}")
        formats.check_format(format)
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("from_dense: the weight is on the meta device (no values to pack); load or "
                             "initialise the model's weights first")
        mask = mask.to(w.device)
        packed = formats.pack(format, w, mask)  # before building: a bad mask leaves nothing behind
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, format=format,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for name, t in packed.items():
                if name == "weight":
                    out.weight.copy_(t)
                else:
                    setattr(out, name, t)
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
        # the layer's state as the user left it: a frozen or evaluating layer stays so
        if format == "masked":
            out.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            out.bias.requires_grad_(linear.bias.requires_grad)
        return out.train(linear.training)

    def to_format(self, format: str) -> "SparseLinear":
        """A new layer holding this one's effective weight ``W * M`` and bias in another
        ``format``: e.g. a ``masked`` layer after sparse fine-tuning, packed to ``bitmap`` or
        ``2:4`` for inference (``2:4`` needs a 2:4 mask: ValueError naming the rows). Keeps
        the train / eval mode and ``requires_grad``; this layer is left as it is."""
        stored = self._stored()
        dense = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                   device=stored.device, dtype=stored.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
                dense.bias.requires_grad_(self.bias.requires_grad)
        if self.format == "masked":
            dense.weight.requires_grad_(self.weight.requires_grad)
        return SparseLinear.from_dense(dense.train(self.training), self.mask, format=format)

    def _stored(self) -> torch.Tensor:
        """The tensor that holds the weight's values: its dtype and device are the layer's."""
        return self.weight if self.format == "masked" else self.values

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in formats.buffers(self.format)}

    @property
    def mask(self) -> torch.Tensor:
        """The stored positions, unpacked (bool, out x in): the keep-mask for ``masked`` and
        ``bitmap``; for ``2:4`` also the zero-filled positions of groups that kept fewer than 2."""
        return formats.stored_mask(self.format, self._tensors(), self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The effective dense weight ``W * M``."""
        with torch.no_grad():
            return formats.unpack(self.format, self._tensors(), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return formats.linear(self.format, x, self._tensors(), self.in_features, self.bias)

    def storage_bytes(self) -> int:
        """Bytes of every tensor that holds the weight (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def dense_bytes(self) -> int:
        """Bytes the dense weight would take in this layer's dtype."""
        return self.out_features * self.in_features * self._stored().element_size()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # What the kernels trust is checked on the state the layer would have after the load
        # (the incoming tensors, the layer's own for keys the state dict does not give, as with
        # strict=False), before anything changes: index tensors in their exact dtype (not
        # converted), a bitmap's 1-D values, offsets that agree with the bits, 2:4 metadata
        # sparse24_pack could have written. Shape mismatches of the other tensors are left to
        # torch, which reports them without copying.
        incoming = {n: state_dict[prefix + n] for n in formats.buffers(self.format)
                    if isinstance(state_dict.get(prefix + n), torch.Tensor)}
        problems = []
        for n, t in incoming.items():
            mine = getattr(self, n)
            if n in ("values", "weight"):
                if not t.is_floating_point():
                    problems.append(f"{prefix}{n} (dtype {t.dtype}: not a floating-point tensor)")
                elif n == "values" and self.format == "bitmap" and t.dim() != 1:
                    problems.append(f"{prefix}values (shape {tuple(t.shape)}: a bitmap's values are 1-D)")
            elif t.dtype != mine.dtype:
                problems.append(f"{prefix}{n} (dtype {t.dtype}, the layer's is {mine.dtype}: index tensors are "
                                "not converted)")
        # shapes too (torch reports a size mismatch only after copying the tensors that fit,
        # which would leave the format's tensors from two layers: a bitmap's values would already
        # have the checkpoint's length)
        shaped = dict(incoming)
        if self.bias is not None and isinstance(state_dict.get(prefix + "bias"), torch.Tensor):
            shaped["bias"] = state_dict[prefix + "bias"]
        for n, t in shaped.items():
            mine = getattr(self, n)
            if not (n == "values" and self.format == "bitmap") and tuple(t.shape) != tuple(mine.shape):
                problems.append(f"{prefix}{n} (shape {tuple(t.shape)} in the state dict, {tuple(mine.shape)} in the "
                                "layer)")
        if problems:
            raise ValueError(_problems("SparseLinear.load_state_dict: nothing was loaded", problems))
        after = {n: incoming.get(n, getattr(self, n)) for n in formats.buffers(self.format)}
        readable = all(t.device.type != "meta" for t in after.values())
        if readable and self.format == "2:4" and after["metadata"].shape == self.metadata.shape:
            bad = formats.bad_24_metadata_rows(after["metadata"], self.in_features)
            if bad:
                raise ValueError(f"{prefix}metadata: rows {bad[:8]}{' ...' if len(bad) > 8 else ''} are not 2:4 "
                                 "metadata sparse24_pack writes (two increasing positions per 4 columns)")
        if readable and self.format == "bitmap":
            bad = formats.bad_bitmap_rows(after["values"].numel(), after["bits"], after["row_ptr"],
                                          after["block_ptr"], self.in_features)
            if bad:
                raise ValueError(f"{prefix or 'SparseLinear'}: bitmap rows {bad[:8]}{' ...' if len(bad) > 8 else ''} "
                                 "have offsets that disagree with their bits, or padding bits set")
        # the number of kept values of a bitmap is data, not shape: the buffer takes the
        # checkpoint's length (converted first: a tensor that cannot be read fails here,
        # before the layer changes)
        if "values" in incoming and self.format == "bitmap" and incoming["values"].shape != self.values.shape:
            self.values = incoming["values"].detach().to(device=self.values.device, dtype=self.values.dtype,
                                                         copy=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format!r}")


def _problems(what: str, problems: list[str]) -> str:
    """One error message listing every problem, one per line."""
    return f"{what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems)


def sparsify(model: nn.Module, masks: Mapping[str, torch.Tensor], format: str = "bitmap", *,
             rows: int = 1) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose ``<module>.weight`` has a mask by a
    :class:`SparseLinear` in ``format`` (default ``bitmap``: compressed, for inference;
    ``masked`` keeps a trainable dense weight for sparse fine-tuning); returns the model.

    ``format="auto"`` picks per layer with :func:`multiflow_kernels.formats.choose_format`
    for the layer's device and dtype and ``rows``, the expected rows of x per call.
    Raises ValueError naming every mask that does not fit, before changing anything: not
    the weight of an ``nn.Linear`` that computes ``nn.Linear.forward`` (a subclass with its
    own forward, or ``nn.MultiheadAttention``'s ``out_proj``, whose weight its parent reads
    directly), unknown name, wrong shape
    or dtype, a weight on the meta device, a weight a forward pre-hook recomputes
    (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``; a parametrization's
    current weight is taken as it is), a weight tied to another parameter (sparsifying
    one user of a shared weight would untie it), not 2:4 for ``format="2:4"``. A layer
    registered under several names is replaced under all of them (by one SparseLinear). The
    sparse layers are all built before the first is swapped in, so an error while packing
    also leaves the model as it was. Each new layer keeps the old one's train / eval mode,
    its parameters' ``requires_grad``, its bias Parameter (the same object) and its forward /
    backward hooks."""
    formats.check_format(format, allow_auto=True)
    formats.check_rows(rows)
    modules = dict(model.named_modules(remove_duplicate=False))  # every name of every module
    module_names: dict[int, list[str]] = {}
    for n, m in modules.items():
        module_names.setdefault(id(m), []).append(n)
    param_names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(n)
    problems = []
    chosen: dict[int, tuple[str, nn.Linear, torch.Tensor, str]] = {}  # id(linear) -> (mask name, linear, mask, format)
    for name, m in masks.items():
        mod_name = name[: -len(".weight")] if name.endswith(".weight") else None
        lin = modules.get(mod_name) if mod_name else None
        if name == "weight" and isinstance(model, nn.Linear):
            problems.append(f"{name} (the model itself is the nn.Linear: sparsify replaces submodules; "
                            "use SparseLinear.from_dense(model, mask))")
            continue
        if isinstance(lin, SparseLinear):
            problems.append(f"{name} (the layer is already a SparseLinear, format {lin.format!r})")
            continue
        if not isinstance(lin, nn.Linear):
            kind = "not the weight of an nn.Linear" if any(name in n for n in param_names.values()) else "not in the model"
            problems.append(f"{name} ({kind})")
            continue
        w = lin.weight
        tied = [n for n in param_names.get(id(w), [])
                if not (n.endswith(".weight") and modules.get(n[: -len(".weight")]) is lin)]
        parent_name = mod_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(lin).forward is not nn.Linear.forward or isinstance(parent, nn.MultiheadAttention):
            why = ("has its own forward" if type(lin).forward is not nn.Linear.forward
                   else "nn.MultiheadAttention uses through .weight directly")
            problems.append(f"{name} (weight of a {type(lin).__name__} that {why}: a SparseLinear in its place "
                            "would change what the model computes)")
        elif (lin._parameters.get("weight") is None and lin._buffers.get("weight") is None
              and not nn.utils.parametrize.is_parametrized(lin, "weight")):
            problems.append(f"{name} (not a Parameter: a forward pre-hook recomputes it, as torch.nn.utils.prune, "
                            "weight_norm and spectral_norm do; make it a plain weight first, e.g. "
                            "torch.nn.utils.prune.remove(module, 'weight'))")
        elif not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            problems.append(f"{name} (mask is not a bool tensor)")
        elif m.layout != torch.strided or m.device.type == "meta":
            problems.append(f"{name} (mask is a {'meta' if m.device.type == 'meta' else str(m.layout)} tensor; "
                            "give a dense bool tensor with values)")
        elif tuple(m.shape) != tuple(w.shape):
            problems.append(f"{name} (mask {tuple(m.shape)} vs weight {tuple(w.shape)})")
        elif w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            problems.append(f"{name} (weight dtype {w.dtype}; the sparse formats take float32, float16 or bfloat16)")
        elif w.device.type == "meta":
            problems.append(f"{name} (weight on the meta device: no values to pack)")
        elif tied:
            problems.append(f"{name} (tied: the same Parameter is also {', '.join(tied[:3])}; sparsifying one of its "
                            "users would untie them)")
        elif id(lin) in chosen:
            first, _, first_mask, _ = chosen[id(lin)]
            if not torch.equal(first_mask.to(m.device), m):
                problems.append(f"{name} (the same module as {first}, with a different mask)")
        else:
            fmt = formats.choose_format(m, w.dtype, w.device, rows) if format == formats.AUTO else format
            if fmt == "2:4":
                try:
                    formats.check_24(m, name)
                except ValueError as e:
                    problems.append(str(e))
                    continue
            chosen[id(lin)] = (name, lin, m, fmt)
    if problems:
        raise ValueError(_problems(f"masks do not fit {type(model).__name__}", problems))
    # every layer built first: an error while packing leaves the model untouched
    built = {key: SparseLinear.from_dense(lin, m, format=fmt) for key, (_, lin, m, fmt) in chosen.items()}
    for key, layer in built.items():
        _carry_over(chosen[key][1], layer)
        for mod_name in module_names[key]:
            parent_name, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


# The hook tables of nn.Module (those this torch has): shared with the replacement, so the
# hooks still run, and the handles that registered them still remove them.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _carry_over(linear: nn.Linear, layer: SparseLinear) -> None:
    """What of ``linear`` its SparseLinear keeps besides the weight: the bias Parameter itself
    (so a bias shared with another module, or held by an optimizer, stays the same object) and
    the module's forward / backward hooks."""
    if linear.bias is not None and linear.bias.dtype == layer.bias.dtype and linear.bias.device == layer.bias.device:
        layer.bias = linear.bias
    for table in _HOOK_TABLES:
        if hasattr(linear, table):
            object.__setattr__(layer, table, getattr(linear, table))
    if hasattr(linear, "_is_full_backward_hook"):
        layer._is_full_backward_hook = linear._is_full_backward_hook


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _layout(model: nn.Module) -> dict:
    return {n: {"format": m.format, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None} for n, m in _sparse_layers(model).items()}


def save_sparse(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole model state (sparse layers in their format, every other parameter and
    buffer) to one safetensors file, atomically, with the format of each layer recorded."""
    from safetensors.torch import save_model

    layout = _layout(model)
    if not layout:
        raise ValueError(f"{type(model).__name__} has no SparseLinear layer: call sparsify(model, masks) first")
    meta = {_META_KEY: json.dumps({"format_version": _FORMAT_VERSION, "layers": layout})}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta))


def _file_dtypes() -> dict:
    """safetensors' dtype names -> torch dtypes (its own table where it has one)."""
    try:
        from safetensors.torch import _TYPES

        return dict(_TYPES)
    except ImportError:  # pragma: no cover (a safetensors without the table)
        names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
                 "U32": "uint32", "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2"}
        return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


def _check_file_tensors(model: nn.Module, path: Path, f) -> tuple[dict[str, str], set[str]]:
    """Every tensor of the open file ``f`` against the model's state (names, shapes, dtypes),
    before anything is copied: ``load_state_dict`` copies tensor by tensor and reports
    mismatches only at the end, which would leave the model half loaded. A bitmap layer's
    ``values`` may have any length (its number of kept weights is data). Tensors of the model
    that share storage are saved once (safetensors), so a name missing from the file is fine
    when another name of the same module attribute (a module registered under several names),
    or the same tensor (same storage, offset, shape and strides), is in it, or when it is
    another view of a saved tensor's storage (loaded with it). Returns (those missing names ->
    the file's name that holds their tensor, the missing views)."""
    state = model.state_dict(keep_vars=True)
    file_dtypes = _file_dtypes()
    named = list(model.named_modules(remove_duplicate=False))
    # every name of every sparse layer: a layer registered under several names is saved once,
    # under whichever name safetensors kept
    sparse = [(n, m) for n, m in named if isinstance(m, SparseLinear)]
    bitmap_values = {f"{n}.values" for n, m in sparse if m.format == "bitmap"}
    metadata_24 = {f"{n}.metadata": m.in_features for n, m in sparse if m.format == "2:4"}
    names_of: dict[int, list[str]] = {}
    module_of: dict[str, nn.Module] = {}
    for n, m in named:
        names_of.setdefault(id(m), []).append(n)
        module_of[n] = m

    def storage(t: torch.Tensor):  # None for tensors that cannot be shared (no bytes)
        return t.untyped_storage().data_ptr() if t.device.type != "meta" and t.untyped_storage().nbytes() else None

    def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
        return (storage(a) is not None and storage(a) == storage(b) and a.storage_offset() == b.storage_offset()
                and a.shape == b.shape and a.stride() == b.stride())

    saved = set(f.keys())
    problems = [f"{k} (in the file, not in the model)" for k in sorted(saved - set(state))]
    alias: dict[str, str] = {}
    views: set[str] = set()
    loaded = {storage(state[k]) for k in saved & set(state)} - {None}
    for k in sorted(set(state) - saved):
        prefix, _, attr = k.rpartition(".")
        held = [f"{a}.{attr}" if a else attr for a in names_of.get(id(module_of.get(prefix)), [])]
        held = [a for a in held if a in saved] or [a for a in sorted(saved & set(state)) if same_tensor(state[a], state[k])]
        if held:
            alias[k] = held[0]
        elif storage(state[k]) is not None and storage(state[k]) in loaded:
            views.add(k)
        else:
            problems.append(f"{k} (in the model, not in the file)")
    for k in sorted(saved & set(state)):
        entry, want = f.get_slice(k), state[k]
        shape = tuple(entry.get_shape())
        if (len(shape) != 1) if k in bitmap_values else (shape != tuple(want.shape)):
            problems.append(f"{k} (shape {shape} in the file, {tuple(want.shape)} in the model)")
        if file_dtypes.get(entry.get_dtype()) != want.dtype:
            problems.append(f"{k} (dtype {entry.get_dtype()} in the file, {want.dtype} in the model)")
        elif k in metadata_24 and shape == tuple(want.shape):
            bad = formats.bad_24_metadata_rows(f.get_tensor(k), metadata_24[k])
            if bad:
                problems.append(f"{k} (rows {bad[:8]}{' ...' if len(bad) > 8 else ''}: not 2:4 metadata)")
    # a bitmap layer's offsets against its bits (the CUDA kernels trust them), once the names,
    # shapes and dtypes fit
    for n, m in sparse if not problems else ():
        keys = [f"{n}.{t}" for t in ("values", "bits", "row_ptr", "block_ptr")]
        if m.format != "bitmap" or not all(k in saved for k in keys):  # another of its names holds them
            continue
        bits, row_ptr, block_ptr = (f.get_tensor(k) for k in keys[1:])
        bad = formats.bad_bitmap_rows(math.prod(f.get_slice(keys[0]).get_shape()), bits, row_ptr, block_ptr,
                                      m.in_features)
        if bad:
            problems.append(f"{n} (bitmap rows {bad[:8]}{' ...' if len(bad) > 8 else ''}: offsets that disagree "
                            "with the bits, or padding bits set)")
    if problems:
        raise ValueError(_problems(f"cannot load {path} into {type(model).__name__}; nothing was loaded", problems))
    return alias, views


def load_sparse(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model``, which must already be
    sparsified with the same layout (same layers and formats); tensors are copied into the
    existing sparse storage, no dense weight is materialised. Every tensor's name, shape and
    dtype is checked against the model before the first is copied: a file that does not fit
    raises ValueError (listing what differs) and leaves the model as it was."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"sparse model file {path} is a folder; give the .safetensors file save_sparse wrote")
    if not path.is_file():
        raise FileNotFoundError(f"sparse model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read sparse model file {path}: not a valid safetensors file ({e})") from None
    if _META_KEY not in header:
        raise ValueError(f"{path} is not a multiflow_kernels sparse model file (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(header[_META_KEY])
        version, layers = meta.get("format_version"), meta["layers"]
        formats_saved = {v["format"] for v in layers.values()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: malformed '{_META_KEY}' metadata ({type(e).__name__}: {e})") from None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: malformed '{_META_KEY}' metadata (format_version {version!r} is not an integer)")
    if version != _FORMAT_VERSION and (version != 1 or "bitmap" in formats_saved):
        raise ValueError(f"{path} was written with sparse file format version {version}; this multiflow_kernels reads "
                         f"version {_FORMAT_VERSION} (and version 1 files without bitmap layers: the bitmap format's "
                         "row_ptr / block_ptr changed). Sparsify and save the model again.")
    saved = layers
    ours = _layout(model)
    if saved != ours:
        diff = sorted(set(saved) ^ set(ours)) or [n for n in saved if saved[n] != ours.get(n)]
        raise ValueError(f"{path} was saved from a model sparsified differently; layers that differ: {diff[:20]}")
    on_meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"cannot load {path} into {type(model).__name__}: {len(on_meta)} of its tensors are on the "
                         f"meta device (e.g. {on_meta[0]}), which holds no data to copy into; model.to_empty(device=...) "
                         "first")
    with safe_open(str(path), framework="pt") as f:
        alias, views = _check_file_tensors(model, path, f)
        state = {k: f.get_tensor(k) for k in f.keys()}
    for k, held in alias.items():  # the names safetensors saved once
        state[k] = state[held]
    try:  # the views come with the tensor whose storage they share
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"cannot load {path} into {type(model).__name__}: {e}") from None
    if set(missing) - views or unexpected:  # _check_file_tensors rules this out
        raise ValueError(f"cannot load {path} into {type(model).__name__}: missing {sorted(set(missing) - views)}, "
                         f"unexpected {sorted(unexpected)}")
    return model


class MemoryReport(dict):
    """``layers`` (name -> format, dense and sparse weight bytes) and totals; ``str()`` is a table."""

    def __str__(self) -> str:
        rows = self["layers"]
        t = self["total"]
        # KiB for small models (a tiny test model's layers would all print 0.000 MiB), else MiB
        unit, scale = ("KiB", 2**10) if t["dense_bytes"] < 16 * 2**20 else ("MiB", 2**20)
        width = max([len(n) for n in rows] + [len("total (sparse layers)")])
        lines = [f"{'layer':<{width}} {'format':<7} {'dense ' + unit:>11} {'sparse ' + unit:>11} {'ratio':>6}"]
        for n, r in rows.items():
            lines.append(f"{n:<{width}} {r['format']:<7} {r['dense_bytes'] / scale:>11.3f} "
                         f"{r['sparse_bytes'] / scale:>11.3f} {r['ratio']:>6.3f}")
        lines.append(f"{'total (sparse layers)':<{width}} {'':<7} {t['dense_bytes'] / scale:>11.3f} "
                     f"{t['sparse_bytes'] / scale:>11.3f} {t['ratio']:>6.3f}")
        lines.append(f"model parameters and buffers: {t['model_bytes'] / scale:.3f} {unit}")
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """Dense vs sparse weight bytes per sparse layer and in total."""
    layers = {}
    for n, m in _sparse_layers(model).items():
        dense = m.dense_bytes()
        sparse = m.storage_bytes()
        layers[n] = {"format": m.format, "dense_bytes": dense, "sparse_bytes": sparse, "ratio": sparse / dense if dense else 0.0}
    dense = sum(r["dense_bytes"] for r in layers.values())
    sparse = sum(r["sparse_bytes"] for r in layers.values())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return MemoryReport(layers=layers, total={"dense_bytes": dense, "sparse_bytes": sparse,
                                              "ratio": sparse / dense if dense else 0.0, "model_bytes": model_bytes})
