"""The Triton kernels behind triton_fused and triton_fused_linear (a helper, not an implementation).

The leading underscore keeps the registry from loading this file as a plugin; triton_fused.py
loads it by path, plans the launches and documents the traffic model.

`ce_kernel`: per tile of rows, an online softmax over the row in fp32, the loss, and (with
COMPUTE_GRAD) a second pass over the same row that writes dLoss/dlogits. Programs are
persistent: program p takes tiles p, p + P, p + 2P, ... so the host decides how many rows
are in flight at once (triton_fused.py sizes P so those rows stay in L2 between the passes).
On a long row the first pass keeps a running max and sum per lane (LANE_STATS) and merges them
once at the row's end, so its loop needs no block-wide reduction (no shuffle, no barrier of its
own); both loops are software-pipelined (STAGES): the loads of the next tiles are in flight
(cp.async into shared memory) while one is folded. Neither changes what is computed
(the interpreter ignores the pipelining), only how much of the memory latency is hidden.

`scale_kernel`: multiplies each row of a buffer by its upstream-gradient factor (one scalar for
every row, or one per row). A tile whose factors are all exactly 1 reads and writes nothing:
the decision is taken on the device, so the host never syncs to learn the factor.

`chunk_stats_kernel` and `chunk_grad_kernel` (triton_fused_linear): the logits of every row
arrive one chunk of vocabulary columns at a time. The first folds a chunk into each row's
running max, sum of exponentials and sum of logits and picks up the target's logit; the second,
once the whole row is known, writes the gradient over a chunk in place.

Row geometry, for vectorised loads at any V: a row of an fp32/bf16 buffer with odd V starts at
an address that is not 16-byte aligned. Each row is split into a head (the < VEC elements up
to its first 16-byte boundary), a body (a multiple of VEC elements, every load aligned, which
the ALIGNED hints tell the compiler) and a tail (< VEC elements). VEC = 16 bytes / element size.

BF16_BITS (Triton interpreter only): bf16 buffers are handed over as int16 and widened by hand,
which is exact and far cheaper than the interpreter's generic float conversion.
"""

import triton
import triton.language as tl


@triton.jit
def _softcap(x, cap):
    # c·tanh(x/c), to a few ulp over the whole range. |y| < 0.4: the odd Taylor series up to
    # y^13 (truncation below 1e-8 relative); (1 - e)/(1 + e) with e = exp(-2|y|) would lose
    # ~8 ulp there to the cancellation in 1 - e. Beyond: that form, with e <= 0.45, which never
    # overflows for large |x|. Plain mul/add/exp only, so the interpreter and every GPU agree.
    y = x / cap
    ys = tl.minimum(tl.maximum(y, -0.4), 0.4)  # keeps the unused polynomial finite for large |y|
    y2 = ys * ys
    p = 21844.0 / 6081075.0
    p = p * y2 - 1382.0 / 155925.0
    p = p * y2 + 62.0 / 2835.0
    p = p * y2 - 17.0 / 315.0
    p = p * y2 + 2.0 / 15.0
    p = p * y2 - 1.0 / 3.0
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(tl.abs(y) < 0.4, ys + ys * y2 * p, tl.where(y < 0, -t, t))


@triton.jit
def _load_f32(ptrs, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f32(ptrs, value, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # fp32 -> bf16 bits, rounding to nearest even (NaN stays NaN)
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptrs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _row_split(rows, stride, base_mis, n_cols, VEC: tl.constexpr):
    # (element offset of each row, head length, body length); base_mis is the buffer's own
    # misalignment in elements, so the split is right even for a view that starts mid-vector
    row_off = rows.to(tl.int64) * stride
    head = tl.minimum((VEC - (base_mis + row_off) % VEC) % VEC, n_cols).to(tl.int32)
    n_body = (n_cols - head) // VEC * VEC
    return row_off, head, n_body


@triton.jit
def _body_ptrs(base_ptr, row_off, head, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    # where each row's aligned body starts; the hint is only given when it is true (16-byte
    # aligned base, so row_off + head is a multiple of VEC)
    body_off = row_off + head
    if ALIGNED:
        body_off = tl.multiple_of(body_off, VEC)
    return base_ptr + body_off


@triton.jit
def _load_z(ptrs, ok, cap, HAS_SOFTCAP: tl.constexpr, BF16_BITS: tl.constexpr):
    # one tile of (capped) logits in fp32; masked lanes read as 0 and are masked again by the caller
    z = _load_f32(ptrs, ok, BF16_BITS)
    if HAS_SOFTCAP:
        z = _softcap(z, cap)
    return z


@triton.jit
def _tile_stats(z, ok, m, s, z_sum, HAS_SMOOTHING: tl.constexpr):
    # fold a tile into the running max m, the running sum s of exp(z - m) (rescaled when m grows)
    # and the plain sum of z (label smoothing). A tile with no valid lane (an empty head) leaves
    # m at -inf: m_ref keeps exp(-inf - -inf) = NaN out of s.
    z_max = tl.where(ok, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z_max, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z_max - m_ref[:, None]), axis=1)
    if HAS_SMOOTHING:
        z_sum += tl.sum(tl.where(ok, z, 0.0), axis=1)
    return m_new, s, z_sum


@triton.jit
def _lane_stats(z, ok, m, s, z_sum, HAS_SMOOTHING: tl.constexpr):
    # the same fold as _tile_stats, but lane by lane: m and s have the tile's shape and each
    # element keeps its own running max and sum over the tiles it has seen, so no value crosses
    # a thread (no shuffle, no barrier) until the row ends (_merge_lanes). One exp per element:
    # e = exp(-|z - m|) is exp(m - z) when z raises the max (s·e + 1) and exp(z - m) otherwise
    # (s + e). Masked lanes and logits of -inf leave the lane as it was (-inf - -inf is NaN);
    # NaN logits go in and make the row NaN.
    take = ok & (z != float("-inf"))
    up = z > m
    e = tl.exp(-tl.abs(z - m))
    s = tl.where(take, tl.where(up, s * e + 1.0, s + e), s)
    m = tl.where(take & up, z, m)
    if HAS_SMOOTHING:
        z_sum += tl.where(ok, z, 0.0)
    return m, s, z_sum


@triton.jit
def _merge_lanes(m_l, s_l, zs_l, m, s, z_sum, HAS_SMOOTHING: tl.constexpr):
    # fold the per-lane statistics of _lane_stats into the row's (m, s, z_sum): one block-wide
    # max and one sum per row. Lanes that saw nothing (m_l = -inf, s_l = 0) add 0.
    m_new = tl.maximum(m, tl.max(m_l, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(s_l * tl.exp(m_l - m_ref[:, None]), axis=1)
    if HAS_SMOOTHING:
        z_sum += tl.sum(zs_l, axis=1)
    return m_new, s, z_sum


@triton.jit
def _tile_grad(z, cols, m, p_scale, scale, safe_t, eps, n_cols, cap,
               HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # dL/dz = p·(1 + 2λ·lse) - (1-ε)·onehot - ε/V, then the softcap chain rule 1 - (z/c)².
    # p = exp(z - m) / s, with 1/s, the z-loss factor and the row's scale folded into p_scale.
    # Not exp(z - lse): for |m| large, lse = m + log s rounds back to m in fp32 and the softmax
    # would come out unnormalised. `cols` are the tile's column indices within the row.
    g = tl.exp(z - m[:, None]) * p_scale[:, None]
    if HAS_SMOOTHING:
        g -= (eps / n_cols) * scale[:, None]
    g = tl.where(cols == safe_t[:, None], g - (1.0 - eps) * scale[:, None], g)
    if HAS_SOFTCAP:
        g *= 1.0 - (z / cap) * (z / cap)
    return g


@triton.jit
def ce_kernel(
    x_ptr, x_stride, x_mis, g_ptr, g_stride, targets_ptr, loss_ptr, zterm_ptr, n_valid_ptr, row_scale_ptr,
    n_rows, n_cols, ignore_index, eps, lam, cap,
    SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    LANE_STATS: tl.constexpr, STAGES: tl.constexpr,
    X_ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr, BF16_BITS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
        # 1. The tile's rows. Rows past the end are clamped onto the last row for addresses
        #    and masked out of every load and store. A target outside [0, V) that is not ignore_index is
        #    `bad`: it is never used as an address (safe_t), and its row's loss and gradient
        #    become NaN so the error shows in any reduction.
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        safe_rows = tl.minimum(rows, n_rows - 1)
        targets = tl.load(targets_ptr + safe_rows).to(tl.int64)
        valid = row_ok & (targets != ignore_index)
        in_range = (targets >= 0) & (targets < n_cols)
        bad = valid & ((targets < 0) | (targets >= n_cols))
        safe_t = tl.where(valid & in_range, targets, 0)

        # 2. Row geometry: head | aligned body | tail (see the module docstring).
        x_off, head, n_body = _row_split(safe_rows, x_stride, x_mis, n_cols, VEC)
        x_row = x_ptr + x_off
        x_body = _body_ptrs(x_ptr, x_off, head, X_ALIGNED, VEC)
        n_body = tl.multiple_of(n_body, VEC)  # lets `cols < n_body` stay constant per vector
        vec = tl.arange(0, VEC)
        live = row_ok[:, None]
        ok_h = (vec[None, :] < head[:, None]) & live
        cols_t = (head + n_body)[:, None] + vec[None, :]
        ok_t = (cols_t < n_cols) & live

        # 3. The target's (capped) logit, read once directly rather than searched for.
        z_t = _load_f32(x_row + safe_t, row_ok, BF16_BITS)
        if HAS_SOFTCAP:
            z_t = _softcap(z_t, cap)

        # 4. First pass: online softmax over head, tail and body, all in fp32. Head and tail
        #    tiles stay live for step 7; so does the body when it fits one tile (SINGLE_BLOCK),
        #    and then the row is read exactly once.
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        z_sum = tl.zeros((BLOCK_N,), tl.float32)
        z_h = _load_z(x_row[:, None] + vec[None, :], ok_h, cap, HAS_SOFTCAP, BF16_BITS)
        m, s, z_sum = _tile_stats(z_h, ok_h, m, s, z_sum, HAS_SMOOTHING)
        z_tl = _load_z(x_row[:, None] + cols_t, ok_t, cap, HAS_SOFTCAP, BF16_BITS)
        m, s, z_sum = _tile_stats(z_tl, ok_t, m, s, z_sum, HAS_SMOOTHING)
        body_len = tl.max(n_body, axis=0)
        if SINGLE_BLOCK:
            cols_b0 = tl.arange(0, BLOCK_V)
            ok_b0 = (cols_b0[None, :] < n_body[:, None]) & live
            z_b0 = _load_z(x_body[:, None] + cols_b0[None, :], ok_b0, cap, HAS_SOFTCAP, BF16_BITS)
            m, s, z_sum = _tile_stats(z_b0, ok_b0, m, s, z_sum, HAS_SMOOTHING)
        elif LANE_STATS:  # per-lane statistics, merged once per row (no block-wide reduction in the loop)
            m_l = tl.full((BLOCK_N, BLOCK_V), float("-inf"), tl.float32)
            s_l = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            zs_l = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            for start in tl.range(0, body_len, BLOCK_V, num_stages=STAGES):
                cols_b = start + tl.arange(0, BLOCK_V)
                ok_b = (cols_b[None, :] < n_body[:, None]) & live
                z_b = _load_z(x_body[:, None] + cols_b[None, :], ok_b, cap, HAS_SOFTCAP, BF16_BITS)
                m_l, s_l, zs_l = _lane_stats(z_b, ok_b, m_l, s_l, zs_l, HAS_SMOOTHING)
            m, s, z_sum = _merge_lanes(m_l, s_l, zs_l, m, s, z_sum, HAS_SMOOTHING)
        else:  # a block-wide max and a block-wide sum per tile, each through shared memory and barriers
            for start in tl.range(0, body_len, BLOCK_V, num_stages=STAGES):
                cols_b = start + tl.arange(0, BLOCK_V)
                ok_b = (cols_b[None, :] < n_body[:, None]) & live
                z_b = _load_z(x_body[:, None] + cols_b[None, :], ok_b, cap, HAS_SOFTCAP, BF16_BITS)
                m, s, z_sum = _tile_stats(z_b, ok_b, m, s, z_sum, HAS_SMOOTHING)

        # 5. Per-row loss: (1-ε)(lse - z_t) + ε(lse - mean z) + λ·lse², 0 on ignored rows, NaN
        #    on bad ones. Differences are taken against m before adding log s (large |m|).
        #    Padding rows read nothing: give them a harmless max and sum (never stored).
        m = tl.where(row_ok, m, 0.0)
        s = tl.where(row_ok, s, 1.0)
        log_s = tl.log(s)
        lse = m + log_s
        loss = (m - z_t) + log_s
        if HAS_SMOOTHING:
            loss = (1.0 - eps) * loss + eps * ((m - z_sum / n_cols) + log_s)
        z_term = lam * lse * lse
        if HAS_ZLOSS:
            loss += z_term
        tl.store(loss_ptr + rows, tl.where(bad, float("nan"), tl.where(valid, loss, 0.0)), mask=row_ok)
        tl.store(zterm_ptr + rows, tl.where(valid, z_term, 0.0), mask=row_ok)

        if COMPUTE_GRAD:
            # 6. The factor of the row's gradient: 1 (SCALE 0), 1/n_valid read from the device
            #    (SCALE 1, mean), or the row's upstream gradient (SCALE 2); 0 if ignored, NaN if bad.
            if SCALE == 1:
                scale = tl.zeros((BLOCK_N,), tl.float32) + 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
            elif SCALE == 2:
                scale = tl.load(row_scale_ptr + safe_rows).to(tl.float32)
            else:
                scale = tl.zeros((BLOCK_N,), tl.float32) + 1.0
            scale = tl.where(bad, float("nan"), tl.where(valid, scale, 0.0))
            p_scale = scale / s
            if HAS_ZLOSS:
                p_scale = p_scale * (1.0 + 2.0 * lam * lse)

            # 7. Second pass: write the gradient. Every tile is read before this program writes
            #    it, so g_ptr may be x_ptr itself (in place). Without SINGLE_BLOCK the body is
            #    read again: the host keeps few enough rows in flight for it to come from L2.
            g_off = safe_rows.to(tl.int64) * g_stride
            g_row = g_ptr + g_off
            g_body = _body_ptrs(g_ptr, g_off, head, G_ALIGNED, VEC)
            g_h = _tile_grad(z_h, vec[None, :], m, p_scale, scale, safe_t, eps, n_cols, cap, HAS_SMOOTHING, HAS_SOFTCAP)
            _store_f32(g_row[:, None] + vec[None, :], g_h, ok_h, BF16_BITS)
            g_tl = _tile_grad(z_tl, cols_t, m, p_scale, scale, safe_t, eps, n_cols, cap, HAS_SMOOTHING, HAS_SOFTCAP)
            _store_f32(g_row[:, None] + cols_t, g_tl, ok_t, BF16_BITS)
            if SINGLE_BLOCK:
                g_b0 = _tile_grad(z_b0, head[:, None] + cols_b0[None, :], m, p_scale, scale, safe_t, eps, n_cols, cap,
                                  HAS_SMOOTHING, HAS_SOFTCAP)
                _store_f32(g_body[:, None] + cols_b0[None, :], g_b0, ok_b0, BF16_BITS)
            else:
                for start in tl.range(0, body_len, BLOCK_V, num_stages=STAGES):
                    cols_b = start + tl.arange(0, BLOCK_V)
                    ok_b = (cols_b[None, :] < n_body[:, None]) & live
                    z_b = _load_z(x_body[:, None] + cols_b[None, :], ok_b, cap, HAS_SOFTCAP, BF16_BITS)
                    g_b = _tile_grad(z_b, head[:, None] + cols_b[None, :], m, p_scale, scale, safe_t, eps, n_cols, cap,
                                     HAS_SMOOTHING, HAS_SOFTCAP)
                    _store_f32(g_body[:, None] + cols_b[None, :], g_b, ok_b, BF16_BITS)


@triton.jit
def scale_kernel(
    buf_ptr, stride, base_mis, factor_ptr, factor_stride, n_rows, n_cols,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, BF16_BITS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
        # 1. The rows' factors (factor_stride 0: one scalar for all). A tile whose rows all
        #    have a factor of exactly 1 skips everything below: no read, no write.
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        safe_rows = tl.minimum(rows, n_rows - 1)
        factor = tl.load(factor_ptr + safe_rows * factor_stride).to(tl.float32)
        todo = row_ok & (factor != 1.0)
        if tl.max(todo.to(tl.int32), axis=0) > 0:
            # 2. Head, tail and aligned body of each row, as in ce_kernel; multiply in fp32.
            row_off, head, n_body = _row_split(safe_rows, stride, base_mis, n_cols, VEC)
            row = buf_ptr + row_off
            body = _body_ptrs(buf_ptr, row_off, head, ALIGNED, VEC)
            n_body = tl.multiple_of(n_body, VEC)
            vec = tl.arange(0, VEC)
            ok_h = (vec[None, :] < head[:, None]) & todo[:, None]
            x_h = _load_f32(row[:, None] + vec[None, :], ok_h, BF16_BITS)
            _store_f32(row[:, None] + vec[None, :], x_h * factor[:, None], ok_h, BF16_BITS)
            cols_t = (head + n_body)[:, None] + vec[None, :]
            ok_t = (cols_t < n_cols) & todo[:, None]
            x_t = _load_f32(row[:, None] + cols_t, ok_t, BF16_BITS)
            _store_f32(row[:, None] + cols_t, x_t * factor[:, None], ok_t, BF16_BITS)
            for start in range(0, tl.max(n_body, axis=0), BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                ok = (cols[None, :] < n_body[:, None]) & todo[:, None]
                x = _load_f32(body[:, None] + cols[None, :], ok, BF16_BITS)
                _store_f32(body[:, None] + cols[None, :], x * factor[:, None], ok, BF16_BITS)


# --- The vocabulary-chunk kernels of triton_fused_linear: the logits of all N rows arrive one
# chunk of columns [col0, col0 + n_cols) at a time, so a row's statistics are merged across
# launches and its gradient is written once the whole row's max and sum are known.


@triton.jit
def chunk_stats_kernel(
    z_ptr, z_stride, targets_ptr, m_ptr, s_ptr, zsum_ptr, zt_ptr, n_rows, n_cols, col0, cap,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # 1. The tile's rows and their running statistics over the earlier chunks (max m, sum s of
    #    exp(z - m), plain sum of z): read, folded with this chunk, written back.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    m = tl.load(m_ptr + safe_rows)
    s = tl.load(s_ptr + safe_rows)
    z_sum = tl.load(zsum_ptr + safe_rows)
    z_row = z_ptr + safe_rows.to(tl.int64) * z_stride
    # 2. One pass over the chunk's columns (usually a single tile), all in fp32.
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = (cols[None, :] < n_cols) & row_ok[:, None]
        z = _load_z(z_row[:, None] + cols[None, :], ok, cap, HAS_SOFTCAP, BF16_BITS)
        m, s, z_sum = _tile_stats(z, ok, m, s, z_sum, HAS_SMOOTHING)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(zsum_ptr + rows, z_sum, mask=row_ok)
    # 3. The target's (capped) logit, from the one chunk that holds it. ignore_index (< 0) and
    #    out-of-range targets fall in no chunk; the host marks those rows.
    t = tl.load(targets_ptr + safe_rows).to(tl.int64) - col0
    here = row_ok & (t >= 0) & (t < n_cols)
    z_t = _load_f32(z_row + tl.where(here, t, 0), here, BF16_BITS)
    if HAS_SOFTCAP:
        z_t = _softcap(z_t, cap)
    tl.store(zt_ptr + rows, z_t, mask=here)


@triton.jit
def chunk_grad_kernel(
    z_ptr, z_stride, targets_ptr, m_ptr, coef_ptr, scale_ptr, n_rows, n_cols, col0, n_vocab, eps, cap,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # 1. One tile: BLOCK_N rows × BLOCK_V columns of the chunk (grid: row tiles × column tiles).
    #    Per row, from the host: the row's max m over the whole vocabulary, coef = scale/s
    #    (times the z-loss factor) and scale (the row's upstream factor; 0 ignored, NaN bad).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    ok = (cols[None, :] < n_cols) & row_ok[:, None]
    m = tl.load(m_ptr + safe_rows)
    coef = tl.load(coef_ptr + safe_rows)
    scale = tl.load(scale_ptr + safe_rows)
    # 2. The target's column within this chunk, or -1 (no column matches) when it lies elsewhere.
    t = tl.load(targets_ptr + safe_rows).to(tl.int64) - col0
    t = tl.where((t >= 0) & (t < n_cols), t, -1)
    # 3. dL/dz over the tile, written over the logits (ε/V uses the whole vocabulary's V).
    ptrs = z_ptr + safe_rows.to(tl.int64)[:, None] * z_stride + cols[None, :]
    z = _load_z(ptrs, ok, cap, HAS_SOFTCAP, BF16_BITS)
    g = _tile_grad(z, cols[None, :], m, coef, scale, t, eps, n_vocab, cap, HAS_SMOOTHING, HAS_SOFTCAP)
    _store_f32(ptrs, g, ok, BF16_BITS)
