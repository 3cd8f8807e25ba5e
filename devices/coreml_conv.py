"""The convolution and pooling kernels (NCHW, 1-D and 2-D) of the Core ML reference interpreter
(:mod:`devices.coreml_interp`); :mod:`devices.coreml_ops` lists them in its table.

Speed: a convolution runs as a matmul over stride-phase views of a padded copy of its input
(im2col), a depthwise one as one multiply-add per kernel tap over contiguous rows. A conv keeps
its padded-input buffers between runs (up to ``CACHE_BYTES`` per interpreter), so kernels are not
thread-safe.
"""
from __future__ import annotations

import math

import numpy as np

from devices.coreml_program import Node, arg, ints
from devices.errors import DeviceError

CACHE_BYTES = 256 << 20  # padded-input buffers kept between runs, per interpreter


def _spatial_pads(pad_type: str, pad, in_hw, k_eff, strides) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as coremltools' ``aggregated_pad`` computes it."""
    if pad_type == "valid":
        return [(0, 0)] * len(in_hw)
    if pad_type == "custom":
        p = ints(pad) if pad is not None else [0] * 2 * len(in_hw)
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(in_hw))]
    if pad_type in ("same", "same_lower"):
        out = []
        for i, k, s in zip(in_hw, k_eff, strides):
            total = max(0, s * math.ceil(i / s) - i + k - s)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise DeviceError(f"unknown pad_type {pad_type!r}")


def _phase_taps(node: Node, x: np.ndarray, pads, kh: int, kw: int, s: tuple[int, int], d: tuple[int, int],
                ho: int, wo: int, pad_value: float = 0.0, contiguous: bool = True):
    """Contiguous views (N, C, Hq * Wq) of the padded input, one per kernel tap (row-major), such
    that output (r, c) of every image and channel is ``sum_tap w_tap * view_tap[n, ch, r * Wq + c]``
    for r < Ho, c < Wo (the other rows and columns of the Hq x Wq grid are junk, cropped by the
    caller). The padded input is split into its s_h x s_w stride phases, each laid out flat (all
    images and channels one after the other), so a tap is one shifted slice of a phase: every
    multiply-add runs over long contiguous rows. ``contiguous=False``: views of the first Ho rows
    only (N, C, Ho * Wq), less work where the views are copied anyway (im2col). Returns the views
    and the grid's (rows, Wq). Buffers are cached per input shape (their padding never changes)."""
    n, c, h, w = x.shape
    (sh, sw), (dh, dw) = s, d
    (pt, _), (pl, _) = pads
    hq, wq = ho + ((kh - 1) * dh) // sh, wo + ((kw - 1) * dw) // sw
    size = n * c * hq * wq
    taps = [((i * dh) % sh, (j * dw) % sw, ((i * dh) // sh) * wq + (j * dw) // sw) for i in range(kh) for j in range(kw)]
    slack = max(off for _, _, off in taps)
    cache = node.cache.setdefault("phases", {})
    key = (x.shape, pad_value)
    bufs = cache.get(key)
    if bufs is None:
        bufs = {}
        for ph_a, ph_b, _ in taps:
            if (ph_a, ph_b) not in bufs:
                bufs[(ph_a, ph_b)] = np.full(size + slack, pad_value, np.float32)
        # kept for the next run (the border stays padding) within the interpreter's budget, for a
        # few input shapes at a time (a bare program may get any batch size)
        held = node.shared.setdefault("cached_bytes", 0)
        if len(cache) >= 4:
            held -= sum(b.nbytes for b in cache.pop(next(iter(cache))).values())
        nbytes = sum(b.nbytes for b in bufs.values())
        if held + nbytes <= CACHE_BYTES:
            cache[key] = bufs
            held += nbytes
        node.shared["cached_bytes"] = held
    for (ph_a, ph_b), buf in bufs.items():
        grid = buf[:size].reshape(n, c, hq, wq)
        r0 = max(0, -(-(pt - ph_a) // sh))  # first phase row that lies inside x
        c0 = max(0, -(-(pl - ph_b) // sw))
        fr, fc = ph_a + r0 * sh - pt, ph_b + c0 * sw - pl  # the x row/col it holds
        if fr >= h or fc >= w or r0 >= hq or c0 >= wq:
            continue
        src = x[:, :, fr::sh, fc::sw][:, :, : hq - r0, : wq - c0]
        grid[:, :, r0:r0 + src.shape[2], c0:c0 + src.shape[3]] = src
    if contiguous:
        return [bufs[(pa, pb)][off:off + size].reshape(n, c, hq * wq) for pa, pb, off in taps], hq, wq
    return [bufs[(pa, pb)][off:off + size].reshape(n, c, hq * wq)[:, :, :ho * wq] for pa, pb, off in taps], ho, wq


def _conv_geometry(a, x, kh, kw):
    nd = x.ndim - 2
    s = tuple(ints(arg(a, "strides", [1] * nd)))
    d = tuple(ints(arg(a, "dilations", [1] * nd)))
    k_eff = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1)
    pads = _spatial_pads(str(arg(a, "pad_type", "valid")), a.get("pad"), x.shape[2:], k_eff, s)
    ho = (x.shape[2] + pads[0][0] + pads[0][1] - k_eff[0]) // s[0] + 1
    wo = (x.shape[3] + pads[1][0] + pads[1][1] - k_eff[1]) // s[1] + 1
    return s, d, pads, ho, wo


def _as_2d(a: dict, keys=("strides", "dilations")) -> dict:
    """A 1-D conv/pool's arguments as a 2-D one's (H = 1)."""
    b = dict(a)
    b["x"] = a["x"][:, :, None, :]
    if "weight" in a:
        b["weight"] = a["weight"][:, :, None, :]
    for k in keys:
        if a.get(k) is not None:
            b[k] = [1] + ints(a[k])
    if a.get("kernel_sizes") is not None:
        b["kernel_sizes"] = [1] + ints(a["kernel_sizes"])
    if a.get("pad") is not None:
        b["pad"] = [0, 0] + ints(a["pad"])
    return b


def conv(a, n):
    """MIL ``conv``: an unpadded 1x1 one as one matmul, a depthwise one tap by tap, others by im2col per group."""
    if a["x"].ndim == 3:
        return conv(_as_2d(a), n)[:, :, 0, :]
    x, w = a["x"], a["weight"]
    groups = int(arg(a, "groups", 1))
    nb, c, _, _ = x.shape
    co, cg, kh, kw = w.shape
    s, d, pads, ho, wo = _conv_geometry(a, x, kh, kw)
    b = a.get("bias")
    if groups == 1 and kh == kw == 1 and not any(p for pp in pads for p in pp):
        xs = x[:, :, ::s[0], ::s[1]][:, :, :ho, :wo] if s != (1, 1) else x
        out = np.matmul(w.reshape(co, c), xs.reshape(nb, c, ho * wo))
        if b is not None:
            out += b[:, None]
        return out.reshape(nb, co, ho, wo)
    if groups == c and cg == 1 and groups > 1:  # depthwise (channel multiplier co // c)
        if co != c:
            x = np.repeat(x, co // c, axis=1)
        views, hq, wq = _phase_taps(n, x, pads, kh, kw, s, d, ho, wo)
        cached = n.cache.get("dw")
        if cached is None or cached[0] is not w or cached[1] != hq * wq:
            # each tap's weights repeated along the grid: both operands of a multiply contiguous
            wf = w.reshape(co, kh * kw)
            cached = n.cache["dw"] = (w, hq * wq, [np.ascontiguousarray(np.broadcast_to(wf[:, t, None], (co, hq * wq)))
                                                   for t in range(kh * kw)])
        tiles = cached[2]
        out = np.multiply(views[0], tiles[0])
        tmp = np.empty_like(out)
        for v, t in zip(views[1:], tiles[1:]):
            np.multiply(v, t, out=tmp)
            out += tmp
        out = out.reshape(nb, co, hq, wq)[:, :, :ho, :wo]
        return out + b[:, None, None] if b is not None else out
    outs = []
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg] if groups > 1 else x
        wg = w[g * (co // groups):(g + 1) * (co // groups)] if groups > 1 else w
        outs.append(_conv_dense(n, xg, wg, pads, s, d, ho, wo))
    out = outs[0] if groups == 1 else np.concatenate(outs, axis=1)
    return out + b[:, None, None] if b is not None else out


def _conv_dense(node: Node, x, w, pads, s, d, ho: int, wo: int):
    """A groups=1 conv as one matmul over the taps' views copied side by side (im2col)."""
    nb, cg = x.shape[:2]
    kh, kw = w.shape[2:]
    views, rows, wq = _phase_taps(node, x, pads, kh, kw, s, d, ho, wo, contiguous=False)
    cols = np.empty((nb, cg, kh * kw, rows * wq), np.float32)
    for t, v in enumerate(views):
        cols[:, :, t] = v
    out = np.matmul(w.reshape(w.shape[0], cg * kh * kw), cols.reshape(nb, cg * kh * kw, rows * wq))
    return out.reshape(nb, -1, rows, wq)[:, :, :ho, :wo]


def pool(kind: str):
    """The kernel of MIL ``avg_pool`` (``kind`` "avg") or ``max_pool`` ("max")."""
    def op(a, n):
        if a["x"].ndim == 3:
            return op(_as_2d(a), n)[:, :, 0, :]
        x = a["x"]
        kh, kw = ints(a["kernel_sizes"])
        s = tuple(ints(arg(a, "strides", [1, 1])))
        pads = _spatial_pads(str(arg(a, "pad_type", "valid")), a.get("pad"), x.shape[2:], (kh, kw), s)
        ceil = bool(arg(a, "ceil_mode", False))
        outs = []
        for dim, (k, st, (pb, pa)) in enumerate(zip((kh, kw), s, pads)):
            size = x.shape[2 + dim]
            span = size + pb + pa - k
            o = (-(-span // st) if ceil else span // st) + 1
            if ceil and (o - 1) * st >= size + pb:
                o -= 1
            outs.append(o)
        ho, wo = outs
        # pad up to what the output grid reads (ceil mode may read past the given padding)
        extra = [max(0, (o - 1) * st + k - (x.shape[2 + i] + pads[i][0] + pads[i][1]))
                 for i, (o, st, k) in enumerate(zip(outs, s, (kh, kw)))]
        width = ((0, 0), (0, 0), (pads[0][0], pads[0][1] + extra[0]), (pads[1][0], pads[1][1] + extra[1]))
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, width, constant_values=fill)
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::s[0], ::s[1]][:, :, :ho, :wo]
        if kind == "max":
            return win.max(axis=(-2, -1))
        total = win.sum(axis=(-2, -1))
        if bool(arg(a, "exclude_padding_from_average", False)):
            ones = np.pad(np.ones(x.shape[2:], np.float32), width[2:])
            cnt = np.lib.stride_tricks.sliding_window_view(ones, (kh, kw))[::s[0], ::s[1]][:ho, :wo].sum(axis=(-2, -1))
        else:  # the window clipped to the input plus its given padding (PyTorch's ceil-mode count)
            lim = [x.shape[2 + i] + pads[i][0] + pads[i][1] for i in range(2)]
            rows = np.minimum(np.arange(ho) * s[0] + kh, lim[0]) - np.arange(ho) * s[0]
            cols = np.minimum(np.arange(wo) * s[1] + kw, lim[1]) - np.arange(wo) * s[1]
            cnt = rows[:, None] * cols[None, :]
        return total / cnt.astype(np.float32)

    return op
