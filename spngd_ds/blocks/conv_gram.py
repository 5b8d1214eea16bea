"""The Gram of a Conv2d layer's im2col patches (A of docs/design.md rule 3), exactly, without F.unfold.

For an input x (N, C, H, W) the patches are the vectors u(o) of length d = C·kh·kw, one per output
location o, in ``F.unfold`` order (c slowest, then kernel row i, then kernel column a). The Gram is
Σ_o u(o) u(o)ᵀ (d, d); with a bias, the patch sum Σ_o u(o) (d,) and the count N·Ho·Wo give A's
last row and column. Three exact ways, picked by :func:`patch_gram`:

- **shift** (stride 1 in both dims, enough channels and locations: :data:`SHIFT_MIN_CHANNELS`):
  block (i, a; j, b) of the Gram is the product of the input with itself shifted by
  δ = ((j - i)·dh, (b - a)·dw) over the window of kernel tap (i, a). Every
  block with the same δ shares one product over the whole image, so a 3x3 layer costs 13 C x C
  products (the distinct δ, half of them by symmetry) instead of the 81 of the im2col Gram, and
  no patch is ever copied. The window differs from the whole image only in a few rows and columns
  at the border, which are subtracted (:class:`_ShiftPlan`).
- **rows** (narrow layers, d < :data:`ROWS_LAYOUT_MAX_D`): patches gathered as rows
  (N·Ho·Wo, d) from a zero-padded channels-last copy, Gram RᵀR.
- **columns** (wide layers): patches as columns (d, N·Ho·Wo) straight from the padded NCHW input,
  Gram by :func:`symmetric_gram`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

#: Conv2d layers outside the shift layout with fewer im2col columns than this gather their patches
#: as rows from a channels-last copy; wider ones as columns. Chosen by timing both on ResNet shapes.
ROWS_LAYOUT_MAX_D = 256

#: Stride-1 Conv2d layers take the shift Gram when they have at least this many input channels
#: and at least as many output locations (N·Ho·Wo) as channels. Below, one im2col product is
#: cheaper: with few channels the shift's many small products cost more in calls than in
#: arithmetic, and with few locations writing its d x d blocks one by one outweighs the products
#: it saves (ResNet-50's 512-channel 7x7 layer at 2 images: 102 against 77 ms; at 32 images the
#: shift is the faster). Timed on this project's CPU machine on ResNet-20 and ResNet-50 shapes.
SHIFT_MIN_CHANNELS = 8

#: Tests switch the shift Gram off to reach the im2col layouts on stride-1 layers.
SHIFT_LAYOUT = True


def symmetric_gram(cols: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``cols @ cols.T`` for a wide ``cols`` (d, K), computing only the upper blocks.

    Only the blocks on and above the diagonal are computed (row blocks of at least ``block``; at
    most 8 of them) and the rest mirrored: about (b + 1)/(2b) of the products for b blocks.
    """
    d = cols.shape[0]
    nb = max(1, min(8, d // block))
    if nb == 1:
        return cols @ cols.t()
    cuts = [round(i * d / nb) for i in range(nb + 1)]
    out = cols.new_empty(d, d)
    for i in range(nb):
        rows_i = cols[cuts[i] : cuts[i + 1]]
        for j in range(i, nb):
            prod = rows_i @ cols[cuts[j] : cuts[j + 1]].t()
            out[cuts[i] : cuts[i + 1], cuts[j] : cuts[j + 1]] = prod
            if j != i:
                out[cuts[j] : cuts[j + 1], cuts[i] : cuts[i + 1]] = prod.t()
    return out


def _padded_channels_last(
    x: torch.Tensor, pad_h: tuple[int, int], pad_w: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``x`` (N, C, H, W) as a zero-padded channels-last copy in ``dtype``.

    The copy is contiguous (N, top + H + bottom, left + W + right, C) with ``pad_h`` = (top,
    bottom), ``pad_w`` = (left, right). Only the border is zeroed: the interior is written once, by
    the copy.
    """
    n, c, h, w = x.shape
    (top, bottom), (left, right) = pad_h, pad_w
    xp = x.new_empty((n, top + h + bottom, left + w + right, c), dtype=dtype)
    xp[:, :top].zero_()
    xp[:, top + h :].zero_()
    xp[:, top : top + h, :left].zero_()
    xp[:, top : top + h, left + w :].zero_()
    xp[:, top : top + h, left : left + w] = x.permute(0, 2, 3, 1)
    return xp


@dataclass(frozen=True)
class _ShiftPlan:
    """What :func:`shift_gram` computes for one input size and layer geometry (cached).

    The input lives in a flat channels-last buffer of ``rows_per_image·width`` positions per image:
    real pixel (r, q) at r·width + q, followed by zero columns and rows wide enough that no shift
    reaches a real pixel of another row or image. Shift δ = (δr, e) is the flat offset δr·width + e.
    Kernel taps are numbered t = i·kw + a; the blocks computed are the pairs t1 <= t2 in that order.
    """

    width: int  #: row pitch of the buffer (W plus at least the widest column shift)
    rows_per_image: int  #: H plus at least the tallest row shift
    shifts: tuple[int, ...]  #: flat offsets of the distinct shifts (δr >= 0; e >= 0 where δr = 0)
    block_shift: tuple[int, ...]  #: per block t1 <= t2, its index in ``shifts``
    #: border terms Σ x(p) x(p + shift)ᵀ over in-image offsets p (every image), ordered by their
    #: number of pixels: per run of equal sizes (terms, pixels per term); then per pixel of every
    #: term, one term after another, its offset in the image and its partner's shift
    term_groups: tuple[tuple[int, int], ...]
    pixel_offsets: tuple[int, ...]
    pixel_shifts: tuple[int, ...]
    #: (block, term, sign), each pair once: block = product of its shift - Σ sign·term
    #: (inclusion-exclusion; on a one-pixel-wide image a row's term is a crossing's, and their
    #: signs are summed here)
    corrections: tuple[tuple[int, int, int], ...]
    #: per tap pair (t1, t2) in row-major order, the index of its block in [blocks, blocksᵀ]
    pair_index: tuple[int, ...]
    inside_rows: tuple[tuple[bool, ...], ...]  #: (kh, H): real row r inside the window of tap row i
    inside_cols: tuple[tuple[bool, ...], ...]  #: (kw, W): real column q inside the window of tap column a


@lru_cache(maxsize=256)
def _shift_plan(h: int, w: int, kh: int, kw: int, dh: int, dw: int, ph: int, pw: int) -> _ShiftPlan:
    """The plan of a stride-1 layer on (H, W) inputs: its shifts, blocks and border corrections.

    Tap (i, a) reads real pixel o + (i·dh - ph, a·dw - pw) for output o in [0, Ho) x [0, Wo), so its
    window is real rows [i·dh - ph, i·dh - ph + Ho) and columns [a·dw - pw, a·dw - pw + Wo). The
    product of a shift sums over every real pixel; a block subtracts the pixels outside its first
    tap's window whose partner p + δ is real: the excluded rows (all columns) plus the excluded
    columns (all rows) less their crossings, counted once each.
    """
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    reach_r, reach_c = dh * (kh - 1), dw * (kw - 1)
    width, rows_per_image = w + reach_c, h + reach_r
    inside_rows = tuple(tuple(i * dh - ph <= r < i * dh - ph + ho for r in range(h)) for i in range(kh))
    inside_cols = tuple(tuple(a * dw - pw <= q < a * dw - pw + wo for q in range(w)) for a in range(kw))
    shift_of: dict[tuple[int, int], int] = {}
    terms: dict[tuple[int, tuple[int, ...]], int] = {}
    block_of: dict[tuple[int, int], int] = {}
    block_shift: list[int] = []
    signed: list[tuple[int, int, int]] = []

    def term(shift: int, offsets: tuple[int, ...]) -> int:
        return terms.setdefault((shift, offsets), len(terms))

    taps = kh * kw
    for t1 in range(taps):
        i, a = divmod(t1, kw)
        for t2 in range(t1, taps):
            j, b = divmod(t2, kw)
            dr, e = (j - i) * dh, (b - a) * dw
            s = shift_of.setdefault((dr, e), len(shift_of))
            blk = block_of.setdefault((t1, t2), len(block_of))
            block_shift.append(s)
            rows = [r for r in range(h) if not inside_rows[i][r] and 0 <= r + dr < h]
            cols = [q for q in range(w) if not inside_cols[a][q] and 0 <= q + e < w]
            signed += [(blk, term(s, tuple(r * width + q for q in range(w))), 1) for r in rows]
            signed += [(blk, term(s, tuple(r * width + q for r in range(h))), 1) for q in cols]
            signed += [(blk, term(s, (r * width + q,)), -1) for r in rows for q in cols]
    shifts = tuple(dr * width + e for (dr, e) in shift_of)
    # terms in order of size, so that each run of equal sizes is one batched product
    order = sorted(terms, key=lambda key: (len(key[1]), terms[key]))
    new_index = {terms[key]: k for k, key in enumerate(order)}
    groups: list[tuple[int, int]] = []
    for _, offs in order:
        if groups and groups[-1][1] == len(offs):
            groups[-1] = (groups[-1][0] + 1, len(offs))
        else:
            groups.append((1, len(offs)))
    merged: dict[tuple[int, int], int] = {}
    for blk, t, sign in signed:
        merged[(blk, new_index[t])] = merged.get((blk, new_index[t]), 0) + sign
    nb = len(block_of)
    pair_index = tuple(
        block_of[(t1, t2)] if t1 <= t2 else nb + block_of[(t2, t1)] for t1 in range(taps) for t2 in range(taps)
    )
    return _ShiftPlan(
        width,
        rows_per_image,
        shifts,
        tuple(block_shift),
        tuple(groups),
        tuple(o for _, offs in order for o in offs),
        tuple(shifts[s] for s, offs in order for _ in offs),
        tuple((blk, t, sign) for (blk, t), sign in merged.items() if sign),
        pair_index,
        inside_rows,
        inside_cols,
    )


@dataclass(frozen=True)
class _PlanTensors:
    """A :class:`_ShiftPlan`'s index and sign tensors on one device, in one dtype.

    Built once: a tensor built from a Python list is a host-to-device copy, a stream
    synchronisation.
    """

    block_shift: torch.Tensor  #: (blocks,) int64
    offsets: torch.Tensor  #: (pixels,) int64: ``pixel_offsets``
    partners: torch.Tensor  #: (pixels,) int64: ``pixel_offsets + pixel_shifts``
    signs: torch.Tensor | None  #: (blocks, terms) of ``dtype``: the corrections, or None
    pair_index: torch.Tensor  #: (taps·taps,) int64
    inside_rows: torch.Tensor  #: (kh, H) of ``dtype``
    inside_cols: torch.Tensor  #: (kw, W) of ``dtype``


_PLAN_TENSORS: dict[tuple[int, torch.device, torch.dtype], tuple[_ShiftPlan, _PlanTensors]] = {}


def _plan_tensors(plan: _ShiftPlan, device: torch.device, dtype: torch.dtype) -> _PlanTensors:
    """The tensors of ``plan`` on ``device`` (cached per plan, device and dtype)."""
    key = (id(plan), torch.device(device), dtype)
    hit = _PLAN_TENSORS.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    offsets = torch.tensor(plan.pixel_offsets, dtype=torch.int64, device=device)
    signs = None
    if plan.corrections:
        blk, term, sign = zip(*plan.corrections, strict=True)
        terms = sum(count for count, _ in plan.term_groups)
        signs = torch.zeros(len(plan.block_shift), terms, dtype=dtype, device=device)
        rows = torch.tensor(blk, dtype=torch.int64, device=device)
        cols = torch.tensor(term, dtype=torch.int64, device=device)
        signs[rows, cols] = torch.tensor(sign, dtype=dtype, device=device)
    built = _PlanTensors(
        block_shift=torch.tensor(plan.block_shift, dtype=torch.int64, device=device),
        offsets=offsets,
        partners=offsets + torch.tensor(plan.pixel_shifts, dtype=torch.int64, device=device),
        signs=signs,
        pair_index=torch.tensor(plan.pair_index, dtype=torch.int64, device=device),
        inside_rows=torch.tensor(plan.inside_rows, dtype=dtype, device=device),
        inside_cols=torch.tensor(plan.inside_cols, dtype=dtype, device=device),
    )
    if len(_PLAN_TENSORS) > 512:
        _PLAN_TENSORS.clear()
    _PLAN_TENSORS[key] = (plan, built)
    return built


def shift_gram(
    x: torch.Tensor,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    bias: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gram (d, d) of the im2col patches of a stride-1 convolution on ``x`` (N, C, H, W).

    In ``F.unfold`` order, d = C·kh·kw, with the patch sum (d,) when ``bias``; computed in
    ``dtype``.

    Exact: each block is a sum over the same pixel pairs as the im2col Gram, in another order.
    """
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    plan = _shift_plan(h, w, kh, kw, dh, dw, ph, pw)
    pitch = plan.rows_per_image * plan.width
    buf = _padded_channels_last(x, (0, plan.rows_per_image - h), (0, plan.width - w), dtype)
    flat = buf.view(n * pitch, c)
    # the last real pixel is at (n - 1)·pitch + (h - 1)·width + w - 1; every shift of it stays in the buffer
    span = (n - 1) * pitch + (h - 1) * plan.width + w
    lhs = flat[:span].t()
    products = flat.new_empty(len(plan.shifts), c, c)
    for k, sh in enumerate(plan.shifts):
        torch.mm(lhs, flat[sh : sh + span], out=products[k])
    idx = _plan_tensors(plan, x.device, dtype)
    # (blocks, C, C): block t1 <= t2 before its corrections
    upper = products.index_select(0, idx.block_shift)
    if plan.corrections:
        # every term's pixels (term after term, each over every image) and their partners: two
        # gathers, then one batched product per run of equal-sized terms
        images = torch.arange(n, device=x.device) * pitch
        first = flat.index_select(0, (idx.offsets[:, None] + images).reshape(-1))
        second = flat.index_select(0, (idx.partners[:, None] + images).reshape(-1))
        terms, start = [], 0
        for count, size in plan.term_groups:
            stop = start + count * size * n
            a, b = first[start:stop].view(count, size * n, c), second[start:stop].view(count, size * n, c)
            terms.append(torch.bmm(a.transpose(1, 2), b))
            start = stop
        border = torch.cat(terms).view(-1, c * c)  # (terms, C·C)
        assert idx.signs is not None
        upper = upper - (idx.signs @ border).view(-1, c, c)
    both = torch.cat([upper, upper.transpose(1, 2)])
    pairs = both.index_select(0, idx.pair_index)  # (taps·taps, C, C)
    taps = kh * kw
    gram = pairs.view(taps, taps, c, c).permute(2, 0, 3, 1).reshape(c * taps, c * taps)
    colsum = None
    if bias:
        per_pixel = buf[:, :h, :w].sum(0)  # (H, W, C)
        colsum = torch.einsum("ir,aq,rqc->cia", idx.inside_rows, idx.inside_cols, per_pixel).reshape(c * kh * kw)
    return gram, colsum


def patch_gram(
    module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Gram (d, d) of the im2col patches of ``x`` (N, C, H, W) for ``module``.

    In ``F.unfold`` order, with the patches' sum (d,) when ``bias`` (else None) and their number
    N·Ho·Wo; computed in ``dtype``.
    """
    assert not isinstance(module.padding, str)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    n, c, h, w = x.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    d = c * kh * kw
    colsum: torch.Tensor | None = None
    if SHIFT_LAYOUT and sh == sw == 1 and kh * kw > 1 and SHIFT_MIN_CHANNELS <= c <= n * ho * wo:
        gram, colsum = shift_gram(x, (kh, kw), (dh, dw), (ph, pw), bias, dtype)
    elif d < ROWS_LAYOUT_MAX_D:
        # rows (N·Ho·Wo, kh·kw·C) from a zero-padded channels-last copy: the gather reads
        # contiguous channel vectors, and the tall-skinny product R^T R is fastest for small d
        xp = _padded_channels_last(x, (ph, ph), (pw, pw), dtype)
        s = xp.stride()
        patches = xp.as_strided((n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
        rows = patches.reshape(n * ho * wo, d)
        gram = rows.t() @ rows  # order (kh, kw, c): permute to (c, kh, kw)
        gram = gram.view(kh, kw, c, kh, kw, c).permute(2, 0, 1, 5, 3, 4).reshape(d, d)
        if bias:
            colsum = rows.sum(0).view(kh, kw, c).permute(2, 0, 1).reshape(d)
    else:
        # columns (C·kh·kw, N·Ho·Wo) in unfold order straight from the padded NCHW input
        xp = x.to(dtype)
        if ph or pw:
            xp = F.pad(xp, (pw, pw, ph, ph))
        s = xp.stride()
        patches = xp.as_strided(
            (c, kh, kw, n, ho, wo), (s[1], s[2] * dh, s[3] * dw, s[0], s[2] * sh, s[3] * sw), xp.storage_offset()
        )
        cols = patches.reshape(d, n * ho * wo)
        gram = symmetric_gram(cols)
        if bias:
            colsum = cols.sum(1)
    return gram, colsum, n * ho * wo
