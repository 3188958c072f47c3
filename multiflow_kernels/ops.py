"""Python entry points of the multiflow ops.

Each op's schema is in csrc/ops.cpp and its kernels in csrc/cpu/, csrc/cuda/ or
multiflow_kernels/triton/. Here: a thin documented function per op, with the
op's fake kernel (the shape/dtype contract, for torch.compile and opcheck)
right under it. The plain-torch twin of every op is in reference.py.

The linear ops (masked_linear, bitmap_linear, sparse24_linear) are called in eager mode
through ``_C``'s entry points (csrc/python_eager.cpp): the same dispatcher call as
``torch.ops.multiflow.<op>.default`` (autograd, autocast, the kernels, dispatch modes),
about 0.9 us cheaper per call than torch.ops' boxed path from Python. They take only plain
tensors with no TorchFunctionMode active and return NotImplemented otherwise (a tensor
subclass, ``with torch.device(...)``, ...); then, and under torch.compile, the function
calls torch.ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # the ops must exist before their fake kernels are registered; eager entry points

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sq_sum_accumulate_(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    """Add the per-feature sum of squares of x's kept tokens into acc, in place.

    ``acc[j] += sum over tokens t with token_mask[t] of float(x[t, j]) ** 2``,
    summed in float32: the streaming activation statistic of calibration.

    Args:
        acc: float32 accumulator of shape (F,), contiguous, on x's device.
        x: activations of shape (..., F), float32, float16 or bfloat16; every
            leading index is a token (a 1-D x is a single token).
        token_mask: None to keep every token, or a bool tensor of shape
            x.shape[:-1] that is False for the tokens to skip (padding); skipped
            tokens are not read (an inf / NaN there changes nothing).

    Deterministic: repeated calls with the same inputs give bitwise-equal results. The
    summation order (and so the last bits) may differ between a contiguous x and a view
    of the same values, between CPU and CUDA, and between GPU models.
    """
    torch.ops.multiflow.sq_sum_accumulate_.default(acc, x, token_mask)


@torch.library.register_fake("multiflow::sq_sum_accumulate_")
def _sq_sum_accumulate_fake(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    torch._check(x.dim() >= 1, lambda: "multiflow::sq_sum_accumulate_: x must have shape (..., F), got a 0-d tensor")
    torch._check(x.dtype in _ACTIVATION_DTYPES, lambda: f"multiflow::sq_sum_accumulate_: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(acc.dtype == torch.float32, lambda: f"multiflow::sq_sum_accumulate_: acc must be float32, got {acc.dtype}")
    torch._check(acc.dim() == 1, lambda: f"multiflow::sq_sum_accumulate_: acc must have shape (F,), got {tuple(acc.shape)}")
    torch._check(
        acc.shape[0] == x.shape[-1],
        lambda: f"multiflow::sq_sum_accumulate_: acc must have shape (F,) with F = x.shape[-1] = {x.shape[-1]}, got {tuple(acc.shape)}",
    )
    torch._check(acc.is_contiguous(), lambda: "multiflow::sq_sum_accumulate_: acc must be contiguous")
    torch._check(acc.device == x.device, lambda: f"multiflow::sq_sum_accumulate_: acc is on {acc.device} but x is on {x.device}")
    if token_mask is not None:
        torch._check(token_mask.dtype == torch.bool, lambda: f"multiflow::sq_sum_accumulate_: token_mask must be bool, got {token_mask.dtype}")
        torch._check(
            token_mask.dim() == x.dim() - 1,
            lambda: f"multiflow::sq_sum_accumulate_: token_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}",
        )
        for i in range(x.dim() - 1):
            torch._check(
                token_mask.shape[i] == x.shape[i],
                lambda: f"multiflow::sq_sum_accumulate_: token_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                f"got {tuple(token_mask.shape)}",
            )
        torch._check(
            token_mask.device == x.device, lambda: f"multiflow::sq_sum_accumulate_: token_mask is on {token_mask.device} but x is on {x.device}"
        )
    return None


def sq_sum(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The per-feature sum of squares of x's kept tokens: a new float32 tensor (F,).

    Same arguments as :func:`sq_sum_accumulate_`, starting from zeros.
    """
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    sq_sum_accumulate_(acc, x, token_mask)
    return acc


# =======================================================================================
# Scoring: flow_importance, flow_scores (entry points + fake kernels)
# =======================================================================================
_WEIGHT_DTYPES = _ACTIVATION_DTYPES


def flow_importance(
    weights: list[Tensor], act_sq_norms: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """MULTIFLOW node importances of many layers, in one call.

    Per layer ``l`` with weight ``W`` (out x in) and activation statistic ``a`` (in,):
    ``w = |W| * w_scale[l]`` and ``r = sqrt(max(a, 0)) * r_scale`` (power-of-two scales
    that bring each maximum into [0.5, 1), so tiny layers do not underflow; an all-zero
    ``a`` gives all-zero importances: every score of the layer is 0 and the tie rule prunes
    it all, as the contract's formulas say), ``A = w * r[None, :]`` in float32, ``imp_out = mean_j A``
    and ``imp_in = mean_i A`` summed in float64 and rounded once to float32. Equal
    (torch.equal) to :func:`multiflow_kernels.reference.flow_importance` on every input
    tested, with one exception both sides share: the float64 sums run in different
    orders, so a mean whose exact value lies within a float64 rounding of a float32
    rounding midpoint (inputs built for it; odds about 1e-7 per element on random data)
    can round to the neighbouring float32 (csrc/cpu/flow.cpp).

    Args:
        weights: 2-D weights (out, in), float32, float16 or bfloat16 (dtypes may mix),
            all on one device; any strides.
        act_sq_norms: float32 (in,) per layer, on its weight's device.

    Returns:
        (imp_out, imp_in, w_scale): lists of float32 (out,) and (in,) tensors, and the
        float32 (L,) tensor of the weight scales.
    """
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:  # no tensor to dispatch on
        return [], [], torch.empty(0, dtype=torch.float32)
    return torch.ops.multiflow.flow_importance.default(weights, act_sq_norms)


def _flow_args_ok(weights: list[Tensor], act_sq_norms: list[Tensor]) -> bool:
    """Whether :func:`_check_flow_args` would pass, in plain Python: its torch._check per
    condition costs ~10 us a layer (2 ms a call over BLIP-base's 171 layers). For real
    tensors only (the fake kernels keep the checks: a symbolic shape would guard); on
    False the caller runs the checks, which name the offender."""
    if len(weights) != len(act_sq_norms):
        return False
    device = weights[0].device if weights else None
    return all(
        w.dim() == 2 and w.dtype in _WEIGHT_DTYPES and w.device == device and a.dtype == torch.float32
        and a.dim() == 1 and a.shape[0] == w.shape[1] and a.device == device
        for w, a in zip(weights, act_sq_norms)
    )


def _check_flow_args(op: str, weights: list[Tensor], act_sq_norms: list[Tensor]) -> None:
    """The contract of flow_importance / flow_scores (the C++ checks' Python twin, for
    the fake kernels and the Triton launchers)."""
    torch._check(
        len(weights) == len(act_sq_norms),
        lambda: f"{op}: weights and act_sq_norms must have the same length (one statistic per layer), "
        f"got {len(weights)} weights and {len(act_sq_norms)} act_sq_norms",
    )
    for l, (w, a) in enumerate(zip(weights, act_sq_norms)):
        torch._check(w.dim() == 2, lambda: f"{op}: weights[{l}] must be 2-D (out, in), got shape {tuple(w.shape)}")
        torch._check(
            w.dtype in _WEIGHT_DTYPES, lambda: f"{op}: weights[{l}] must be float32, float16 or bfloat16, got {w.dtype}"
        )
        torch._check(
            w.device == weights[0].device,
            lambda: f"{op}: weights[{l}] is on {w.device} but weights[0] is on {weights[0].device} "
            "(all layers must be on one device)",
        )
        torch._check(a.dtype == torch.float32, lambda: f"{op}: act_sq_norms[{l}] must be float32, got {a.dtype}")
        torch._check(
            a.dim() == 1 and a.shape[0] == w.shape[1],
            lambda: f"{op}: act_sq_norms[{l}] must have shape (in,) where in = weights[{l}].shape[1] = "
            f"{w.shape[1]}, got shape {tuple(a.shape)}",
        )
        torch._check(
            a.device == w.device,
            lambda: f"{op}: act_sq_norms[{l}] must be on the device of weights[{l}] ({w.device}), got {a.device}",
        )


@torch.library.register_fake("multiflow::flow_importance")
def _flow_importance_fake(weights: list[Tensor], act_sq_norms: list[Tensor]):
    _check_flow_args("multiflow::flow_importance", weights, act_sq_norms)
    imp_out = [w.new_empty(w.shape[0], dtype=torch.float32) for w in weights]
    imp_in = [w.new_empty(w.shape[1], dtype=torch.float32) for w in weights]
    device = weights[0].device if weights else torch.device("cpu")
    return imp_out, imp_in, torch.empty(len(weights), dtype=torch.float32, device=device)


def flow_scores(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    """The MULTIFLOW flow score of every weight of many layers, in one call.

    ``score_l = (imp_out[:, None] * (|W_l| * w_scale[l])) * imp_in[None, :]`` in float32,
    with the importances of :func:`flow_importance`: a new contiguous float32 tensor of
    each weight's shape. Equal (bitwise) to :func:`multiflow_kernels.reference.flow_scores`
    whenever the importances are (see :func:`flow_importance`). Same arguments as
    :func:`flow_importance`.
    """
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:
        return []
    return torch.ops.multiflow.flow_scores.default(weights, act_sq_norms)


@torch.library.register_fake("multiflow::flow_scores")
def _flow_scores_fake(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    _check_flow_args("multiflow::flow_scores", weights, act_sq_norms)
    return [w.new_empty(w.shape, dtype=torch.float32) for w in weights]



# =======================================================================================
# Selection: kth_smallest_group, kth_smallest_each, count_at_most, flow_kth_each,
# flow_masks, nm_mask (entry points + fake kernels)
# =======================================================================================
# Exact k-th values by a radix select on the float32 bit pattern (no sort, no
# concatenation of the group); equal to torch.kthvalue on the float32 values.


def _check_value_list(op: str, name: str, values: list[Tensor]) -> None:
    for i, v in enumerate(values):
        torch._check(
            v.dtype in _ACTIVATION_DTYPES,
            lambda: f"{op}: {name}[{i}] must be float32, float16 or bfloat16, got {v.dtype}",
        )
        torch._check(
            v.device == values[0].device,
            lambda: f"{op}: every tensor must be on one device, got {name}[{i}] on {v.device} "
            f"and the first on {values[0].device}",
        )


def _check_ks(op: str, numels: list[int], ks: list[int]) -> None:
    torch._check(len(ks) == len(numels), lambda: f"{op}: ks must have one entry per tensor ({len(numels)}), got {len(ks)}")
    for i, (k, n) in enumerate(zip(ks, numels)):
        torch._check(0 <= k <= n, lambda: f"{op}: ks[{i}] must be in [0, {n}], got {k}")


def kth_smallest_group(values: list[Tensor], k: int, absolute: bool = False) -> Tensor:
    """The k-th smallest (1-based) of all elements of ``values`` together.

    Equal to ``torch.kthvalue(torch.cat([v.float().flatten() for v in values]), k)``
    (``|v|`` when ``absolute``), without concatenating: the multimodal prior's
    threshold over every layer of a modality.

    Args:
        values: float32/float16/bfloat16 tensors of any shapes (empty ones allowed),
            on one device.
        k: 1 <= k <= the total number of elements.
        absolute: select on ``|v|``.

    Returns:
        A 0-d float32 tensor. NaNs count as larger than +inf, as in torch.kthvalue;
        -0.0 and +0.0 count as one value, and an answer of zero is +0.0.
    """
    if not values:
        raise RuntimeError(f"multiflow::kth_smallest_group: k must be in [1, 0] (no values), got k = {k}")
    return torch.ops.multiflow.kth_smallest_group.default(list(values), k, absolute)


@torch.library.register_fake("multiflow::kth_smallest_group")
def _kth_smallest_group_fake(values: list[Tensor], k: int, absolute: bool = False) -> Tensor:
    op = "multiflow::kth_smallest_group"
    _check_value_list(op, "values", values)
    total = sum(v.numel() for v in values)
    torch._check(1 <= k <= total, lambda: f"{op}: k must be in [1, {total}], got k = {k}")
    return values[0].new_empty((), dtype=torch.float32)


def kth_smallest_each(values: list[Tensor], ks: list[int], absolute: bool = False) -> Tensor:
    """Per tensor, its ks[l]-th smallest element (1-based; ``-inf`` where ks[l] == 0).

    All tensors are selected together (one pass over memory serves every tensor).

    Args:
        values: float32/float16/bfloat16 tensors on one device.
        ks: one rank per tensor, 0 <= ks[l] <= values[l].numel().
        absolute: select on ``|v|``.

    Returns:
        float32 tensor of shape (len(values),).
    """
    if not values:
        _check_ks("multiflow::kth_smallest_each", [], list(ks))
        return torch.empty(0, dtype=torch.float32)
    return torch.ops.multiflow.kth_smallest_each.default(list(values), list(ks), absolute)


@torch.library.register_fake("multiflow::kth_smallest_each")
def _kth_smallest_each_fake(values: list[Tensor], ks: list[int], absolute: bool = False) -> Tensor:
    op = "multiflow::kth_smallest_each"
    _check_value_list(op, "values", values)
    _check_ks(op, [v.numel() for v in values], ks)
    return values[0].new_empty((len(values),), dtype=torch.float32)


def count_at_most(values: list[Tensor], threshold: Tensor, absolute: bool = False) -> Tensor:
    """Per tensor, how many of its elements are ``<= threshold`` (``|v|`` when ``absolute``).

    With the threshold of :func:`kth_smallest_group`, this gives each layer's
    sparsity under the multimodal prior.

    Args:
        values: float32/float16/bfloat16 tensors on one device.
        threshold: 0-d float32 tensor on the same device (NaN counts nothing).
        absolute: compare ``|v|``.

    Returns:
        int64 tensor of shape (len(values),).
    """
    return torch.ops.multiflow.count_at_most.default(list(values), threshold, absolute)


@torch.library.register_fake("multiflow::count_at_most")
def _count_at_most_fake(values: list[Tensor], threshold: Tensor, absolute: bool = False) -> Tensor:
    op = "multiflow::count_at_most"
    _check_value_list(op, "values", values)
    torch._check(threshold.dtype == torch.float32, lambda: f"{op}: threshold must be float32, got {threshold.dtype}")
    torch._check(threshold.dim() == 0, lambda: f"{op}: threshold must be a 0-d tensor, got {tuple(threshold.shape)}")
    for v in values:
        torch._check(v.device == threshold.device, lambda: f"{op}: threshold must be on the values' device")
    return threshold.new_empty((len(values),), dtype=torch.int64)


def _check_flow(op: str, weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor) -> None:
    n = len(weights)
    torch._check(
        len(imp_out) == n and len(imp_in) == n,
        lambda: f"{op}: weights, imp_out and imp_in must have one entry per layer, got {n}, {len(imp_out)} "
        f"and {len(imp_in)}",
    )
    torch._check(w_scale.dtype == torch.float32, lambda: f"{op}: w_scale must be float32, got {w_scale.dtype}")
    torch._check(
        w_scale.dim() == 1 and w_scale.shape[0] == n,
        lambda: f"{op}: w_scale must have shape (L,) with L = {n}, got {tuple(w_scale.shape)}",
    )
    _check_value_list(op, "weights", weights)
    for i, (w, o, a) in enumerate(zip(weights, imp_out, imp_in)):
        torch._check(w.dim() == 2, lambda: f"{op}: weights[{i}] must be 2-D (out, in), got {tuple(w.shape)}")
        torch._check(
            o.dtype == torch.float32 and a.dtype == torch.float32,
            lambda: f"{op}: imp_out[{i}] and imp_in[{i}] must be float32, got {o.dtype} and {a.dtype}",
        )
        torch._check(
            o.dim() == 1 and o.shape[0] == w.shape[0],
            lambda: f"{op}: imp_out[{i}] must have shape (out,) = ({w.shape[0]},), got {tuple(o.shape)}",
        )
        torch._check(
            a.dim() == 1 and a.shape[0] == w.shape[1],
            lambda: f"{op}: imp_in[{i}] must have shape (in,) = ({w.shape[1]},), got {tuple(a.shape)}",
        )
        for t in (w, o, a):
            torch._check(t.device == w_scale.device, lambda: f"{op}: every tensor must be on w_scale's device")


def flow_kth_each(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, ks: list[int]
) -> Tensor:
    """Per layer, the ks[l]-th smallest flow score (``-inf`` where ks[l] == 0).

    The score ``(imp_out[i] * (|W_ij| * w_scale[l])) * imp_in[j]`` (float32, in that
    order: bitwise :func:`reference.flow_score_of`) is computed on the fly and never
    written to memory.

    Args:
        weights: (out, in) float32/float16/bfloat16 weights on one device.
        imp_out, imp_in: float32 (out,) and (in,) node importances per layer
            (see flow_importance).
        w_scale: float32 (L,) power-of-two scales (see flow_importance).
        ks: one rank per layer, 0 <= ks[l] <= weights[l].numel().

    Returns:
        float32 tensor of shape (L,).
    """
    return torch.ops.multiflow.flow_kth_each.default(list(weights), list(imp_out), list(imp_in), w_scale, list(ks))


@torch.library.register_fake("multiflow::flow_kth_each")
def _flow_kth_each_fake(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, ks: list[int]
) -> Tensor:
    op = "multiflow::flow_kth_each"
    _check_flow(op, weights, imp_out, imp_in, w_scale)
    _check_ks(op, [w.numel() for w in weights], ks)
    return w_scale.new_empty((len(weights),), dtype=torch.float32)


def flow_masks(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, thresholds: Tensor
) -> list[Tensor]:
    """Per layer, the keep-mask ``flow score > thresholds[l]`` (ties at the threshold pruned).

    Same score as :func:`flow_kth_each`, computed on the fly; with its thresholds this
    is MULTIFLOW's mask. ``thresholds`` is float32 (L,); ``-inf`` keeps every weight whose
    score is not NaN. A NaN score is never kept (NaN > t is false), and a NaN threshold keeps
    nothing: the selection ops order NaN above +inf, so a threshold taken at the last rank of
    a layer with a NaN score prunes the whole layer (``masks_from_stats`` refuses non-finite
    weights before it gets here).

    Returns:
        One contiguous bool tensor per layer, of the weight's shape.
    """
    return torch.ops.multiflow.flow_masks.default(list(weights), list(imp_out), list(imp_in), w_scale, thresholds)


@torch.library.register_fake("multiflow::flow_masks")
def _flow_masks_fake(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, thresholds: Tensor
) -> list[Tensor]:
    op = "multiflow::flow_masks"
    _check_flow(op, weights, imp_out, imp_in, w_scale)
    torch._check(thresholds.dtype == torch.float32, lambda: f"{op}: thresholds must be float32, got {thresholds.dtype}")
    torch._check(
        thresholds.dim() == 1 and thresholds.shape[0] == len(weights),
        lambda: f"{op}: thresholds must have shape (L,) with L = {len(weights)}, got {tuple(thresholds.shape)}",
    )
    torch._check(
        thresholds.device == w_scale.device,
        lambda: f"{op}: thresholds must be on the weights' device {w_scale.device}, got {thresholds.device}",
    )
    return [w.new_empty(w.shape, dtype=torch.bool) for w in weights]


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M keep-mask: the n largest of every m consecutive scores of each row.

    Among equal scores the lower index is kept (a stable descending sort); NaN
    counts as the largest score.

    Args:
        scores: (R, C) float32/float16/bfloat16 with C % m == 0 (e.g. a flow score
            or |W|; for 2:4, n = 2 and m = 4 along the input dimension).
        n, m: 0 <= n <= m, m >= 1.

    Returns:
        Contiguous bool tensor (R, C).
    """
    return torch.ops.multiflow.nm_mask.default(scores, n, m)


@torch.library.register_fake("multiflow::nm_mask")
def _nm_mask_fake(scores: Tensor, n: int, m: int) -> Tensor:
    op = "multiflow::nm_mask"
    torch._check(
        scores.dtype in _ACTIVATION_DTYPES, lambda: f"{op}: scores must be float32, float16 or bfloat16, got {scores.dtype}"
    )
    torch._check(scores.dim() == 2, lambda: f"{op}: scores must be 2-D (R, C), got {tuple(scores.shape)}")
    torch._check(m >= 1, lambda: f"{op}: m must be >= 1, got m = {m}")
    torch._check(0 <= n <= m, lambda: f"{op}: n must be in [0, m] = [0, {m}], got n = {n}")
    torch._check(
        scores.shape[1] % m == 0, lambda: f"{op}: the number of columns C = {scores.shape[1]} must be a multiple of m = {m}"
    )
    return scores.new_empty(scores.shape, dtype=torch.bool)



# =======================================================================================
# Mask packing: pack_mask, unpack_mask (entry points + fake kernels)
# =======================================================================================


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into 32 bits per int32 word: bool (R, C) -> int32 (R, ceil(C / 32)).

    Bit ``b`` of word ``w`` of row ``r`` is ``mask[r, 32 * w + b]`` (bit 31 is the
    int32's sign bit, so words may be negative); the padding bits of a row's last
    word are 0. The inverse is :func:`unpack_mask`.

    Args:
        mask: bool tensor of shape (R, C), any strides, CPU or CUDA.
    """
    return torch.ops.multiflow.pack_mask.default(mask)


@torch.library.register_fake("multiflow::pack_mask")
def _pack_mask_fake(mask: Tensor) -> Tensor:
    torch._check(mask.dtype == torch.bool, lambda: f"multiflow::pack_mask: mask must be a bool tensor, got {mask.dtype}")
    torch._check(mask.dim() == 2, lambda: f"multiflow::pack_mask: mask must have shape (R, C), got {tuple(mask.shape)}")
    rows, cols = mask.shape
    return mask.new_empty((rows, (cols + 31) // 32), dtype=torch.int32)


def unpack_mask(bits: Tensor, cols: int) -> Tensor:
    """Unpack the words of :func:`pack_mask`: int32 (R, ceil(cols / 32)) -> bool (R, cols).

    ``out[r, c]`` is bit ``c % 32`` of ``bits[r, c // 32]``; padding bits are ignored.

    Args:
        bits: int32 tensor of shape (R, W) with ``W == ceil(cols / 32)``.
        cols: the number of columns of the unpacked mask, ``>= 0``.
    """
    return torch.ops.multiflow.unpack_mask.default(bits, cols)


@torch.library.register_fake("multiflow::unpack_mask")
def _unpack_mask_fake(bits: Tensor, cols: int) -> Tensor:
    torch._check(bits.dtype == torch.int32, lambda: f"multiflow::unpack_mask: bits must be an int32 tensor, got {bits.dtype}")
    torch._check(bits.dim() == 2, lambda: f"multiflow::unpack_mask: bits must have shape (R, W), got {tuple(bits.shape)}")
    torch._check(cols >= 0, lambda: f"multiflow::unpack_mask: cols must be >= 0, got {cols}")
    torch._check(
        bits.shape[1] == (cols + 31) // 32,
        lambda: f"multiflow::unpack_mask: bits must have W = ceil(cols / 32) = {(cols + 31) // 32} words per row, got {tuple(bits.shape)}",
    )
    return bits.new_empty((bits.shape[0], cols), dtype=torch.bool)


# =======================================================================================
# Matmul: masked_linear (entry point, fake kernels, autograd)
# =======================================================================================
# The mask is applied inside the kernel (no dense W * M is ever stored), and the
# gradient of a pruned weight is exactly 0: an optimizer without weight decay
# never revives it.


def masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ (weight * mask).T + bias`` with ``mask = unpack_mask(mask_bits, in_features)``.

    Differentiable in x, weight and bias (see :func:`masked_linear_backward`); the
    gradient of weight is exactly 0 where the mask is False. Sums run in float32; the
    result is rounded once to x's dtype.

    Args:
        x: (..., in_features), float32, float16 or bfloat16, any strides.
        weight: (out_features, in_features), x's dtype.
        mask_bits: int32 (out_features, ceil(in_features / 32)), as :func:`pack_mask`
            makes it; bit ``b`` of word ``w`` of row ``r`` keeps ``weight[r, 32 * w + b]``.
        bias: None or (out_features,), x's dtype.

    Returns:
        (..., out_features) in x's dtype.
    """
    if not torch.compiler.is_compiling():
        y = _C.masked_linear(x, weight, mask_bits, bias)  # eager entry point: see the module docstring
        if y is not NotImplemented:
            return y
    return torch.ops.multiflow.masked_linear.default(x, weight, mask_bits, bias)


def _check_masked_linear_args(op: str, x: Tensor, weight: Tensor, mask_bits: Tensor) -> None:
    """The argument contract shared by both ops (and the Triton launchers)."""
    torch._check(
        x.dtype in _ACTIVATION_DTYPES, lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}"
    )
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have shape (..., in_features), got a 0-d tensor")
    torch._check(
        weight.dim() == 2, lambda: f"{op}: weight must have shape (out_features, in_features), got {tuple(weight.shape)}"
    )
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"{op}: in_features mismatch: x.shape[-1] = {x.shape[-1]} but weight has shape {tuple(weight.shape)}",
    )
    torch._check(
        mask_bits.dtype == torch.int32,
        lambda: f"{op}: mask_bits must be an int32 tensor (pack_mask's output), got {mask_bits.dtype}",
    )
    words = (weight.shape[1] + 31) // 32
    torch._check(
        mask_bits.dim() == 2 and mask_bits.shape[0] == weight.shape[0] and mask_bits.shape[1] == words,
        lambda: f"{op}: mask_bits must have shape (out_features, ceil(in_features / 32)) = "
        f"({weight.shape[0]}, {words}), got {tuple(mask_bits.shape)}",
    )
    torch._check(
        weight.device == x.device and mask_bits.device == x.device,
        lambda: f"{op}: x, weight and mask_bits must be on one device, got {x.device}, {weight.device}, {mask_bits.device}",
    )


def _check_grad_out(op: str, grad_out: Tensor, x: Tensor, weight: Tensor) -> None:
    """masked_linear_backward's grad_out: x.shape[:-1] + (out_features,), x's dtype and device."""
    expect = (*x.shape[:-1], weight.shape[0])
    torch._check(
        tuple(grad_out.shape) == expect,
        lambda: f"{op}: grad_out must have shape x.shape[:-1] + (out_features,) = {expect}, got {tuple(grad_out.shape)}",
    )
    torch._check(grad_out.dtype == x.dtype, lambda: f"{op}: grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    torch._check(grad_out.device == x.device,
                 lambda: f"{op}: grad_out is on {grad_out.device} but x is on {x.device}")


def _check_bias(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        return
    torch._check(
        bias.dim() == 1 and bias.shape[0] == weight.shape[0],
        lambda: f"{op}: bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}",
    )
    torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    torch._check(bias.device == x.device, lambda: f"{op}: bias is on {bias.device} but x is on {x.device}")


@torch.library.register_fake("multiflow::masked_linear")
def _masked_linear_fake(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Tensor | None = None) -> Tensor:
    op = "multiflow::masked_linear"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_bias(op, x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def masked_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask_bits: Tensor, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`masked_linear`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_x = grad_out @ (weight * mask)`` (x's shape), ``grad_weight = (grad_out^T @ x) * mask``
    (exactly 0 at pruned places), ``grad_bias = grad_out`` summed over the leading dims;
    float32 sums, rounded once to x's dtype. Only the outputs with ``output_mask[i]`` True
    are computed; the others are (0,)-shaped tensors of x's dtype (a custom op returns a
    real tensor in every slot of its tuple).

    Args:
        grad_out: (..., out_features), x's leading shape and dtype.
        x, weight, mask_bits: as for :func:`masked_linear`.
        output_mask: three bools: compute grad_x, grad_weight, grad_bias.
    """
    return torch.ops.multiflow.masked_linear_backward.default(grad_out, x, weight, mask_bits, output_mask)


@torch.library.register_fake("multiflow::masked_linear_backward")
def _masked_linear_backward_fake(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask_bits: Tensor, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    op = "multiflow::masked_linear_backward"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_grad_out(op, grad_out, x, weight)
    skipped = x.new_empty(0)
    return (
        x.new_empty(x.shape) if output_mask[0] else skipped,
        x.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
        x.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0),
    )


def _masked_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, mask_bits, bias = inputs
    ctx.save_for_backward(x, weight, mask_bits)
    ctx.has_bias = bias is not None


def _masked_linear_backward_autograd(ctx, grad_out: Tensor):
    x, weight, mask_bits = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], ctx.has_bias and needs[3]]
    grad_x, grad_w, grad_b = masked_linear_backward(grad_out.contiguous(), x, weight, mask_bits, output_mask)
    return (
        grad_x if output_mask[0] else None,
        grad_w if output_mask[1] else None,
        None,  # mask_bits: integer, not differentiable
        grad_b if output_mask[2] else None,
    )


torch.library.register_autograd(
    "multiflow::masked_linear", _masked_linear_backward_autograd, setup_context=_masked_linear_setup_context
)


# Double backward. With create_graph=True autograd records the masked_linear_backward call
# above, so that op needs a formula of its own: without one torch's fallback only warned and
# took its outputs as constants, and every second-order gradient through masked_linear was
# silently 0. The formula is registered on masked_linear_backward itself (rather than a
# plain-torch path in _masked_linear_backward_autograd under grad mode) so that every order
# runs on the kernels with the same contract: float32 sums rounded once to x's dtype, no dense
# W * M, exactly 0 at pruned places (nothing a gradient penalty does revives a pruned weight);
# a direct call of masked_linear_backward is differentiable too, and with grad mode off (the
# usual create_graph=False step) the op still goes straight to the kernel, no autograd node.
# The formula only calls masked_linear and masked_linear_backward, so it is differentiable in
# turn (any order). With M the mask and (ux, uw, ub) the upstream gradients of
# (grad_x, grad_weight, grad_bias) = (g @ (W*M), (g^T @ x) * M, g summed):
#   d g = ux @ (W*M)^T + x @ (uw*M)^T + ub = masked_linear(ux, W) + masked_linear(x, uw)  (ub: one's bias)
#   d x = g @ (uw*M)                        = masked_linear_backward(g, x, uw)[0]
#   d W = (g^T @ ux) * M                    = masked_linear_backward(g, ux, W)[1]


def _masked_linear_backward_setup_context(ctx, inputs, output) -> None:
    grad_out, x, weight, mask_bits, output_mask = inputs
    ctx.save_for_backward(grad_out, x, weight, mask_bits)
    ctx.output_mask = list(output_mask)
    ctx.set_materialize_grads(False)  # an output nothing used gets None: no work for it


def _masked_linear_backward_backward(ctx, up_x, up_w, up_b):
    grad_out, x, weight, mask_bits = ctx.saved_tensors
    # A skipped output is a (0,)-shaped placeholder: nothing flows back through it.
    up_x, up_w, up_b = (up if on else None for up, on in zip((up_x, up_w, up_b), ctx.output_mask))
    needs = ctx.needs_input_grad
    d_grad_out = d_x = d_w = None
    if needs[0]:
        terms = []
        if up_x is not None:
            terms.append(masked_linear(up_x, weight, mask_bits, up_b))
        if up_w is not None:
            terms.append(masked_linear(x, up_w, mask_bits, up_b if up_x is None else None))
        if not terms and up_b is not None:
            terms.append(up_b.expand(grad_out.shape))
        if terms:
            d_grad_out = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    if needs[1] and up_w is not None:
        d_x = masked_linear_backward(grad_out, x, up_w, mask_bits, [True, False, False])[0]
    if needs[2] and up_x is not None:
        d_w = masked_linear_backward(grad_out, up_x, weight, mask_bits, [False, True, False])[1]
    return d_grad_out, d_x, d_w, None, None  # mask_bits, output_mask: not differentiable


torch.library.register_autograd(
    "multiflow::masked_linear_backward",
    _masked_linear_backward_backward,
    setup_context=_masked_linear_backward_setup_context,
)


# =======================================================================================
# Bitmap format: bitmap_pack, bitmap_unpack, bitmap_linear (entry points + fake kernels)
# =======================================================================================
# The weight is stored as its kept values plus the mask's bits and two offset tables;
# bitmap_linear decodes it inside the kernel, so a 75%-sparse float32 weight moves
# about 9 bits per weight instead of 32.


# Columns per block_ptr block (kBitmapBlockCols in csrc/bitmap.h), and the most kept weights
# a bitmap format holds (row_ptr is int32: kBitmapMaxNnz).
BITMAP_BLOCK_COLS = 512
BITMAP_MAX_NNZ = 2**31 - 1


def block_ptr_cols(in_features: int) -> int:
    """Columns of a bitmap format's block_ptr: one per 512-column block after the first."""
    return max((in_features + BITMAP_BLOCK_COLS - 1) // BITMAP_BLOCK_COLS - 1, 0)


def bitmap_pack(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compress ``weight`` (out, in) under the bool keep-``mask`` into the bitmap format.

    Returns ``(values, bits, row_ptr, block_ptr)``:

    - values: (nnz,), weight's dtype: the kept weights in row-major order;
    - bits: int32 (out, ceil(in / 32)), exactly :func:`pack_mask` of mask;
    - row_ptr: int32 (out + 1,): index in values of row r's first kept weight (row_ptr[out] = nnz,
      at most 2^31 - 1);
    - block_ptr: int32 (out, max(ceil(in / 512) - 1, 0)): ``block_ptr[r, b - 1]`` = kept weights
      of row r in columns [0, 512 b), for the 512-column blocks b >= 1 (block 0 starts at
      ``row_ptr[r]``; its offset, 0, is not stored).

    Weight metadata per row: 4 bytes of row_ptr + 4 per 512 columns past the first, so a
    75%-sparse float16 weight takes 0.25 (values) + 0.0625 (bits) + 2 * ceil(in / 512) / in
    of its dense bytes: 0.318x at 768 inputs, 0.316x at 3072.

    Args:
        weight: (out_features, in_features), float32, float16 or bfloat16.
        mask: bool, weight's shape.
    """
    return torch.ops.multiflow.bitmap_pack.default(weight, mask)


def _check_weight_and_mask(op: str, weight: Tensor, mask: Tensor) -> None:
    """The arguments of a packing op (fake kernels, the CUDA composite of triton/bitmap_format.py):
    a 2-D float weight and a bool mask of its shape, on its device."""
    torch._check(
        weight.dtype in _ACTIVATION_DTYPES, lambda: f"{op}: weight must be float32, float16 or bfloat16, got {weight.dtype}"
    )
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: mask must be a bool tensor, got {mask.dtype}")
    torch._check(
        mask.shape == weight.shape, lambda: f"{op}: mask must have weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}"
    )
    torch._check(mask.device == weight.device, lambda: f"{op}: mask is on {mask.device} but weight is on {weight.device}")


@torch.library.register_fake("multiflow::bitmap_pack")
def _bitmap_pack_fake(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_weight_and_mask("multiflow::bitmap_pack", weight, mask)
    out, cols = weight.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (
        weight.new_empty((nnz,)),
        weight.new_empty((out, (cols + 31) // 32), dtype=torch.int32),
        weight.new_empty((out + 1,), dtype=torch.int32),
        weight.new_empty((out, block_ptr_cols(cols)), dtype=torch.int32),
    )


def bitmap_unpack(values: Tensor, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor, in_features: int) -> Tensor:
    """The dense weight (out_features, in_features) of the bitmap format: values at the
    kept places, zeros elsewhere; ``bitmap_unpack(*bitmap_pack(W, M), in) == W * M`` exactly.

    On CPU a format whose ``row_ptr`` counts or ``block_ptr`` offsets disagree with ``bits``,
    or whose ``bits`` set a padding bit, raises ``RuntimeError`` naming the row before
    anything is written."""
    return torch.ops.multiflow.bitmap_unpack.default(values, bits, row_ptr, block_ptr, in_features)


def _check_bitmap_format(
    op: str, values: Tensor, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor, in_features: int
) -> None:
    torch._check(in_features >= 0, lambda: f"{op}: in_features must be >= 0, got {in_features}")
    torch._check(
        values.dtype in _ACTIVATION_DTYPES, lambda: f"{op}: values must be float32, float16 or bfloat16, got {values.dtype}"
    )
    torch._check(values.dim() == 1, lambda: f"{op}: values must be 1-D (nnz,), got shape {tuple(values.shape)}")
    torch._check(
        values.numel() <= BITMAP_MAX_NNZ,
        lambda: f"{op}: values must have at most 2^31 - 1 elements (row_ptr is int32), got {values.numel()}",
    )
    torch._check(bits.dtype == torch.int32, lambda: f"{op}: bits must be an int32 tensor (pack_mask's output), got {bits.dtype}")
    words = (in_features + 31) // 32
    torch._check(
        bits.dim() == 2 and bits.shape[1] == words,
        lambda: f"{op}: bits must have shape (out_features, ceil(in_features / 32)) = (out_features, {words}), "
        f"got {tuple(bits.shape)}",
    )
    rows = bits.shape[0]
    torch._check(row_ptr.dtype == torch.int32, lambda: f"{op}: row_ptr must be an int32 tensor, got {row_ptr.dtype}")
    torch._check(
        row_ptr.dim() == 1 and row_ptr.shape[0] == rows + 1,
        lambda: f"{op}: row_ptr must have shape (out_features + 1,) = ({rows + 1},), got {tuple(row_ptr.shape)}",
    )
    torch._check(block_ptr.dtype == torch.int32, lambda: f"{op}: block_ptr must be an int32 tensor, got {block_ptr.dtype}")
    bp_cols = block_ptr_cols(in_features)
    torch._check(
        block_ptr.dim() == 2 and block_ptr.shape[0] == rows and block_ptr.shape[1] == bp_cols,
        lambda: f"{op}: block_ptr must have shape (out_features, max(ceil(in_features / 512) - 1, 0)) = "
        f"({rows}, {bp_cols}), got {tuple(block_ptr.shape)}",
    )
    torch._check(
        bits.device == values.device and row_ptr.device == values.device and block_ptr.device == values.device,
        lambda: f"{op}: values, bits, row_ptr and block_ptr must be on one device",
    )


@torch.library.register_fake("multiflow::bitmap_unpack")
def _bitmap_unpack_fake(values: Tensor, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor, in_features: int) -> Tensor:
    _check_bitmap_format("multiflow::bitmap_unpack", values, bits, row_ptr, block_ptr, in_features)
    return values.new_empty((bits.shape[0], in_features))


# bitmap_unpack is linear in values: W = scatter of values to the kept places (row-major), so
# d values = dW at the kept places, in the same order. bitmap_linear's backward
# (csrc/linear_autograd.cpp) computes grad_x = grad_y @ bitmap_unpack(values): with
# create_graph=True this formula is what carries a gradient penalty on grad_x back to values
# (without it torch only warned and took the unpacked W as a constant in values).
def _bitmap_unpack_setup_context(ctx, inputs, output) -> None:
    _, bits, _, _, in_features = inputs
    ctx.save_for_backward(bits)
    ctx.in_features = in_features


def _bitmap_unpack_backward(ctx, grad_w: Tensor):
    (bits,) = ctx.saved_tensors
    grad_values = grad_w.masked_select(unpack_mask(bits, ctx.in_features)) if ctx.needs_input_grad[0] else None
    return grad_values, None, None, None, None


torch.library.register_autograd(
    "multiflow::bitmap_unpack", _bitmap_unpack_backward, setup_context=_bitmap_unpack_setup_context
)


def bitmap_linear(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    row_ptr: Tensor,
    block_ptr: Tensor,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """``y = x @ W.T + bias`` with W (out_features, in_features) the weight of the bitmap
    format (see :func:`bitmap_pack`), decoded inside the kernel (no dense copy of W).
    Sums run in float32; the result is rounded once to x's dtype.

    Args:
        x: (..., in_features), values' dtype (float32, float16 or bfloat16).
        values, bits, row_ptr, block_ptr: :func:`bitmap_pack`'s output.
        in_features: the number of columns of W.
        bias: None or (out_features,), x's dtype.

    On CPU a format whose ``row_ptr`` counts disagree with ``bits``, or whose ``bits`` set a
    padding bit past ``in_features`` (``pack_mask`` leaves them 0), raises ``RuntimeError``
    naming the row; ``block_ptr`` is not read on CPU (the CUDA kernels read it to start a
    512-column chunk) and not checked there (``bitmap_unpack`` and the load paths,
    ``formats.bad_bitmap_rows``, check it); on CUDA nothing is checked (no device sync per
    call: every load stays inside ``values``, but the result is then undefined), so pass what
    ``bitmap_pack`` made.
    """
    if not torch.compiler.is_compiling():
        y = _C.bitmap_linear(x, values, bits, row_ptr, block_ptr, in_features, bias)  # eager entry point: see the module docstring
        if y is not NotImplemented:
            return y
    return torch.ops.multiflow.bitmap_linear.default(x, values, bits, row_ptr, block_ptr, in_features, bias)


def _check_linear_input(op: str, x: Tensor, values: Tensor, in_features: int, rows: int, bias: Tensor | None) -> None:
    """x and bias of a linear op over a compressed weight (as csrc/linear_input.h checks them)."""
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have shape (..., in_features), got a 0-d tensor")
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x must have values' dtype {values.dtype}, got {x.dtype}")
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"{op}: in_features mismatch: x.shape[-1] = {x.shape[-1]} but in_features = {in_features}",
    )
    torch._check(x.device == values.device, lambda: f"{op}: x is on {x.device} but values is on {values.device}")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == rows,
            lambda: f"{op}: bias must have shape (out_features,) = ({rows},), got {tuple(bias.shape)}",
        )
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
        torch._check(bias.device == x.device, lambda: f"{op}: bias is on {bias.device} but x is on {x.device}")


def _register_bitmap_linear_fake(op: str) -> None:
    """The fake kernel of bitmap_linear, _bitmap_linear_cuda and _bitmap_linear_triton (same
    schema): the checks, then y's shape."""

    @torch.library.register_fake(op)
    def _fake(x, values, bits, row_ptr, block_ptr, in_features, bias=None):
        _check_bitmap_linear_args(op, x, values, bits, row_ptr, block_ptr, in_features, bias)
        return x.new_empty((*x.shape[:-1], bits.shape[0]))


def _check_bitmap_linear_args(
    op: str,
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    row_ptr: Tensor,
    block_ptr: Tensor,
    in_features: int,
    bias: Tensor | None,
) -> None:
    """bitmap_linear's argument contract (the fake kernel and the Triton launcher)."""
    _check_bitmap_format(op, values, bits, row_ptr, block_ptr, in_features)
    _check_linear_input(op, x, values, in_features, bits.shape[0], bias)


def _bitmap_linear_cuda(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    row_ptr: Tensor,
    block_ptr: Tensor,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`bitmap_linear` in CUDA C++ (csrc/cuda/bitmap.cu), CUDA tensors only: the
    private op ``multiflow::_bitmap_linear_cuda``. The public op calls it on CUDA unless
    ``MULTIFLOW_BITMAP_CUDA=triton`` (multiflow_kernels/triton). Same contract; one pass
    over the format for up to 16 rows of x in float16 / bfloat16 (tensor cores, W decoded in
    registers) and up to 8 in float32 (or under ``MULTIFLOW_BITMAP_GEMV=v1``, the older
    few-row kernel; ``MULTIFLOW_BITMAP_GEMV=tc2``: the tensor-core kernel with a leaner
    decode, opt-in until it has been measured on a GPU), more through a dense decode and
    cuBLAS. Benchmarks and tests call it
    directly to measure and check it beside the Triton kernel."""
    return torch.ops.multiflow._bitmap_linear_cuda.default(x, values, bits, row_ptr, block_ptr, in_features, bias)


for _op in ("multiflow::bitmap_linear", "multiflow::_bitmap_linear_cuda", "multiflow::_bitmap_linear_triton"):
    _register_bitmap_linear_fake(_op)
del _op


# =======================================================================================
# 2:4 format: sparse24_pack, sparse24_unpack, sparse24_linear (entry points + fake kernels)
# =======================================================================================
# A weight that keeps at most 2 of every 4 consecutive inputs is stored as its kept values
# (half the columns) plus 4 bits of positions per 4 columns: 18 bits per 4 fp16 weights
# instead of 64, in the layout the sparse tensor cores of sm_80+ read (csrc/sparse24.h).


def sparse24_pack(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Compress ``weight`` (out, in) under a 2:4 keep-``mask`` into the 2:4 format.

    The row is cut into chunks of 4 consecutive columns (``in % 4 == 0``); the mask keeps
    at most 2 weights of each chunk (:func:`nm_mask` with ``n, m = 2, 4`` makes such a
    mask). Returns ``(values, metadata)``:

    - values: (out, in / 2), weight's dtype. Chunk ``q`` of row ``r`` (columns
      ``4q .. 4q + 3``) owns ``values[r, 2q]`` and ``values[r, 2q + 1]``: its kept weights
      in increasing column order, copied bit for bit. A chunk that keeps fewer than 2 is
      filled up with zeros at its lowest unused positions, so every chunk names 2 distinct
      positions.
    - metadata: int16 (out, ceil(in / 16)). Chunk ``q`` of row ``r`` is described by the
      4 bits at bit ``4 * (q % 4)`` of ``metadata[r, q // 4]``: bits 0-1 hold the position
      (0..3) in the chunk of ``values[r, 2q]``, bits 2-3 that of ``values[r, 2q + 1]``;
      always first < second. The padding chunks of a row's last word (``in % 16 != 0``)
      are 0. Each word is bit for bit the 16-bit half of the metadata register that
      ``mma.sp.m16n8k32`` reads for one row and 16 columns.

    Raises:
        ValueError: where the mask keeps more than 2 of some 4 consecutive weights; the
            message names the rows (the first few, and how many in all).

    Args:
        weight: (out_features, in_features), float32, float16 or bfloat16, in % 4 == 0.
        mask: bool, weight's shape.
    """
    return torch.ops.multiflow.sparse24_pack.default(weight, mask)


def _check_sparse24_in_features(op: str, in_features: int) -> None:
    torch._check(
        in_features % 4 == 0,
        lambda: f"{op}: in_features must be a multiple of 4 for the 2:4 format, got {in_features}",
    )


@torch.library.register_fake("multiflow::sparse24_pack")
def _sparse24_pack_fake(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    op = "multiflow::sparse24_pack"
    _check_weight_and_mask(op, weight, mask)
    out, cols = weight.shape
    _check_sparse24_in_features(op, cols)
    return weight.new_empty((out, cols // 2)), weight.new_empty((out, (cols + 15) // 16), dtype=torch.int16)


def sparse24_unpack(values: Tensor, metadata: Tensor) -> Tensor:
    """The dense weight (out_features, in_features = 2 * values.shape[1]) of the 2:4 format:
    each chunk's two values at the positions its metadata names, zeros elsewhere;
    ``sparse24_unpack(*sparse24_pack(W, M)) == W * M`` exactly."""
    return torch.ops.multiflow.sparse24_unpack.default(values, metadata)


def _check_sparse24_format(op: str, values: Tensor, metadata: Tensor) -> None:
    torch._check(
        values.dtype in _ACTIVATION_DTYPES, lambda: f"{op}: values must be float32, float16 or bfloat16, got {values.dtype}"
    )
    torch._check(
        values.dim() == 2, lambda: f"{op}: values must have shape (out_features, in_features / 2), got {tuple(values.shape)}"
    )
    rows, cols = values.shape[0], 2 * values.shape[1]
    _check_sparse24_in_features(op, cols)
    torch._check(
        metadata.dtype == torch.int16,
        lambda: f"{op}: metadata must be an int16 tensor (sparse24_pack's output), got {metadata.dtype}",
    )
    words = (cols + 15) // 16
    torch._check(
        metadata.dim() == 2 and metadata.shape[0] == rows and metadata.shape[1] == words,
        lambda: f"{op}: metadata must have shape (out_features, ceil(in_features / 16)) = ({rows}, {words}) "
        f"for values of shape {tuple(values.shape)}, got {tuple(metadata.shape)}",
    )
    torch._check(
        metadata.device == values.device, lambda: f"{op}: metadata is on {metadata.device} but values is on {values.device}"
    )


@torch.library.register_fake("multiflow::sparse24_unpack")
def _sparse24_unpack_fake(values: Tensor, metadata: Tensor) -> Tensor:
    _check_sparse24_format("multiflow::sparse24_unpack", values, metadata)
    return values.new_empty((values.shape[0], 2 * values.shape[1]))


def sparse24_linear(x: Tensor, values: Tensor, metadata: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ W.T + bias`` with W (out_features, in_features) the weight of the 2:4 format
    (see :func:`sparse24_pack`), decoded inside the kernel (no dense copy of W). Sums run
    in float32; the result is rounded once to x's dtype. Only the two positions each chunk
    names are multiplied, as the sparse tensor cores do: an inf or NaN of x at a position a
    row's metadata does not name does not reach that row (where ``F.linear`` on the dense
    weight gives NaN); a zero-filled position of a group that kept fewer than 2 is named.

    Args:
        x: (..., in_features) with in_features = 2 * values.shape[1], values' dtype
            (float32, float16 or bfloat16).
        values, metadata: :func:`sparse24_pack`'s output. The metadata's contents are not
            checked per call (a chunk naming a position twice gives results that depend on
            the kernel); ``load_sparse`` and ``SparseLinear.load_state_dict`` check them
            once (:func:`multiflow_kernels.formats.bad_24_metadata_rows`).
        bias: None or (out_features,), x's dtype.
    """
    if not torch.compiler.is_compiling():
        y = _C.sparse24_linear(x, values, metadata, bias)  # eager entry point: see the module docstring
        if y is not NotImplemented:
            return y
    return torch.ops.multiflow.sparse24_linear.default(x, values, metadata, bias)


@torch.library.register_fake("multiflow::sparse24_linear")
def _sparse24_linear_fake(x: Tensor, values: Tensor, metadata: Tensor, bias: Tensor | None = None) -> Tensor:
    op = "multiflow::sparse24_linear"
    _check_sparse24_format(op, values, metadata)
    rows = values.shape[0]
    _check_linear_input(op, x, values, 2 * values.shape[1], rows, bias)
    return x.new_empty((*x.shape[:-1], rows))
