"""The Triton kernels behind :mod:`sketchfisher.kernels` (imported only where Triton is)."""

import triton
import triton.language as tl



@triton.jit
def _fmix32(h):  # h: uint32; multiplications wrap modulo 2**32
    h = h ^ (h >> 16)
    h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)

@triton.jit
def _hash(ctr, lo, hi):
    return _fmix32(_fmix32(ctr ^ lo) ^ hi)


@triton.jit
def _total(a):  # [BR, Q, BM] -> [BR]
    return tl.sum(tl.sum(a, axis=2), axis=1)


@triton.jit
def sketch_kernel(g_ptr, w_ptr, c_ptr, o_ptr, u_ptr, wsc_ptr, csc_ptr, osc_ptr, keys_ptr, hoff_ptr, out_ptr,
                  n, H, size, tiles, stride_n, row_stride, tiles_per_prog, scale,
                  COLS: tl.constexpr, CONTIG: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
                  S: tl.constexpr, SP: tl.constexpr, TT: tl.constexpr, WORDS: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr,
                  F: tl.constexpr, HAS_W: tl.constexpr, HAS_C: tl.constexpr, HAS_O: tl.constexpr,
                  MU: tl.constexpr, TWEAK: tl.constexpr, W_SC: tl.constexpr, C_SC: tl.constexpr,
                  O_SC: tl.constexpr, O_IS_C: tl.constexpr = False, TILED: tl.constexpr = False,
                  PREFETCH: tl.constexpr = False):
    # One program: rows [rb·BR, +BR) of head h over tiles [chunk·tiles_per_prog, +tiles_per_prog).
    # Each step handles TT tiles x S bands at once (axis q = tile·S + band) so that many loads are in flight.
    # TILED (S = 1, whole tiles): the preparations (w, c, o, u) are stored tile by tile in the order the rotated tile
    # reads them (tile_order_kernel), so their loads are contiguous; the gradient's stay rotated.
    # PREFETCH: each step issues the next step's loads before its own arithmetic (two steps' loads in flight a program;
    # the rotated loads cannot be pipelined by Triton, which copies only aligned vectors asynchronously).
    Q: tl.constexpr = TT * SP  # SP: S padded to a power of two
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    rb = tl.program_id(2)
    rows = rb * BR + tl.arange(0, BR)
    row_ok = rows < n
    lo = tl.load(keys_ptr + 2 * h).to(tl.uint32)
    hi = tl.load(keys_ptr + 2 * h + 1).to(tl.uint32)
    hoff = tl.load(hoff_ptr + h)
    poff = h.to(tl.int64) * size
    # one-byte weight, centre, other: each head block's values are its codes times its scale ([H] fp32 each)
    wsc = 1.0
    csc = 1.0
    osc = 1.0
    if W_SC:
        wsc = tl.load(wsc_ptr + h)
    if C_SC:
        csc = tl.load(csc_ptr + h)
    if O_SC:
        osc = tl.load(osc_ptr + h)
    q = tl.arange(0, Q)
    tq, band = q // SP, q % SP
    j = tl.arange(0, BM)
    j3 = j[None, None, :]
    rows3 = rows[:, None, None].to(tl.int64) * stride_n
    rok3 = row_ok[:, None, None]
    # Every accumulator keeps the tile's shape and is reduced once after the loop: a reduction across BM inside the
    # loop costs shuffles and a barrier per step, which made the kernel slower than its loads.
    acc = tl.zeros((BR, Q, BM), dtype=tl.float32)
    nacc = tl.zeros((BR, Q, BM), dtype=tl.float32)
    cacc = tl.zeros((BR, Q, BM), dtype=tl.float32)
    sacc = tl.zeros((BR, Q, BM), dtype=tl.float32)  # the centred vector against its own centre (scaled centring)
    uacc0 = tl.zeros((BR, Q, BM), dtype=tl.float32)  # the raw gradient against up to two conflict weights
    uacc1 = tl.zeros((BR, Q, BM), dtype=tl.float32)
    usize = (h * 0 + H).to(tl.int64) * size  # (H may arrive as a constexpr int)
    t0 = chunk * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, tiles)
    if PREFETCH:  # (the first step's loads; each step then issues the next one's before its own arithmetic)
        xr, u0r, u1r, wr, cr, orr = _side_loads(g_ptr, w_ptr, c_ptr, o_ptr, u_ptr, t0, t1, tq, band, j3, rows3, rok3,
                                                lo, hi, hoff, poff, usize, size, tiles, row_stride, COLS, CONTIG, M, S,
                                                TWEAK, TILED, HAS_W, HAS_C, HAS_O, O_IS_C, MU)
    for tb in range(t0, t1, TT):
        t = tb + tq                                                           # [Q]
        tile_ctr = (band * tiles + t).to(tl.uint32)
        if PREFETCH:  # (this step's values were loaded a step ago; the next step's loads go out now)
            x, u0, u1, wv, cen, ov = xr, u0r, u1r, wr, cr, orr
            xr, u0r, u1r, wr, cr, orr = _side_loads(g_ptr, w_ptr, c_ptr, o_ptr, u_ptr, tb + TT, t1, tq, band, j3, rows3,
                                                    rok3, lo, hi, hoff, poff, usize, size, tiles, row_stride, COLS,
                                                    CONTIG, M, S, TWEAK, TILED, HAS_W, HAS_C, HAS_O, O_IS_C, MU)
            ep, okp = j3, j3 < 0  # (unused)
        else:  # (each preparation loaded where it is used: fewer values live at once, fewer registers)
            gptr, gok, ep, okp = _side_places(g_ptr, tb, t1, tq, band, j3, rows3, rok3, lo, hi, hoff, size, tiles,
                                              row_stride, COLS, CONTIG, M, S, TWEAK, TILED)
            x = tl.load(gptr, mask=gok, other=0.0)
            u0, u1, wv, cen, ov = x, x, x, x, x  # (placeholders: _at loads them)
        x = x.to(tl.float32)
        if MU >= 1:
            uacc0 += x * _at(u0, u_ptr + poff, ep, okp, PREFETCH).to(tl.float32)
        if MU >= 2:
            uacc1 += x * _at(u1, u_ptr + usize + poff, ep, okp, PREFETCH).to(tl.float32)
        if F == 1:
            x = x * x
        elif F == 2:
            x = tl.abs(x)
        if HAS_W:
            wv = _at(wv, w_ptr + poff, ep, okp, PREFETCH).to(tl.float32)
            if W_SC:
                wv = wv * wsc
            x = x * wv
        if HAS_C:
            cen = _at(cen, c_ptr + poff, ep, okp, PREFETCH).to(tl.float32)
            if C_SC:
                cen = cen * csc
        if HAS_O:
            if O_IS_C:  # (the same values: loaded once)
                ov = cen
            else:
                ov = _at(ov, o_ptr + poff, ep, okp, PREFETCH).to(tl.float32)
                if O_SC:
                    ov = ov * osc
            cacc += x * ov
        if HAS_C:
            x = x - cen
            sacc += x * cen
        nacc += x * x
        wctr = tile_ctr[:, None] * WORDS + tl.arange(0, BW)[None, :]          # [Q, BW]
        words = _hash(wctr.to(tl.uint32), lo, hi)
        if BW == 1:
            wj = tl.broadcast_to(words, (Q, BM))
        else:
            wj = tl.reshape(tl.broadcast_to(words[:, :, None], (Q, BW, 32)), (Q, BM), can_reorder=False)
        neg = ((wj >> (j[None, :] & 31).to(tl.uint32)) & 1) != 0
        acc += tl.where(neg[None, :, :], -x, x)
    # partial sums of this column chunk into out [chunks, n, H, S·BM + 3 + MU]: sketch, ‖ṽ‖², cross, ⟨ṽ, c⟩, g·u
    W: tl.constexpr = S * BM + 3 + MU
    out = tl.sum(tl.reshape(acc, (BR, TT, SP, BM), can_reorder=False), axis=1) * scale    # [BR, SP, BM]
    bands = tl.arange(0, SP)
    base = ((chunk.to(tl.int64) * n + rows) * H + h) * W
    tl.store(out_ptr + base[:, None, None] + bands[None, :, None] * BM + j3, out,
             mask=rok3 & (bands < S)[None, :, None])
    tl.store(out_ptr + base + S * BM, _total(nacc) / S, mask=row_ok)   # every band visits each entry once
    tl.store(out_ptr + base + S * BM + 1, _total(cacc) / S, mask=row_ok)
    tl.store(out_ptr + base + S * BM + 2, _total(sacc) / S, mask=row_ok)
    if MU >= 1:
        tl.store(out_ptr + base + S * BM + 3, _total(uacc0) / S, mask=row_ok)
    if MU >= 2:
        tl.store(out_ptr + base + S * BM + 4, _total(uacc1) / S, mask=row_ok)


@triton.jit
def _side_places(g_ptr, tb, t1, tq, band, j3, rows3, rok3, lo, hi, hoff, size, tiles, row_stride, COLS: tl.constexpr,
                 CONTIG: tl.constexpr, M: tl.constexpr, S: tl.constexpr, TWEAK: tl.constexpr, TILED: tl.constexpr):
    # Where one step of sketch_kernel reads (tiles tb + tq, each rotated by its shift; masked past t1): the gradient's
    # pointers and mask [BR, Q, BM], and the preparations' offsets and mask [1, Q, BM] (as stored: in tile order, ep
    # is the tile in memory order).
    t = tb + tq
    tile_ctr = (band * tiles + t).to(tl.uint32)
    c = (_hash(tile_ctr, lo, hi ^ TWEAK) % M).to(tl.int32)
    o = (j3 - c[None, :, None] + M) % M                                  # [1, Q, BM]
    e = o + (t * M)[None, :, None]  # the tile, loaded rotated; int32: a head block has < 2**31 entries
    ok = (j3 < M) & (e < size) & ((t < t1) & (band < S))[None, :, None]
    if TILED:  # (a mask of its own: one made from the rotated e would hide the contiguity)
        ep = j3 + (t * M)[None, :, None]
        okp = (j3 < M) & (ep < size) & (t < t1)[None, :, None]
    else:
        ep = e
        okp = ok
    if CONTIG:
        addr = hoff + e
    else:
        addr = hoff + (e // COLS) * row_stride + e % COLS
    return g_ptr + rows3 + addr, rok3 & ok, ep, okp


@triton.jit
def _at(value, ptr, ep, okp, LOADED: tl.constexpr):
    # A preparation's values of one step: ``value`` where it was LOADED already, else loaded from ptr + ep now.
    if LOADED:
        return value
    return tl.load(ptr + ep, mask=okp, other=0.0)


@triton.jit
def _side_loads(g_ptr, w_ptr, c_ptr, o_ptr, u_ptr, tb, t1, tq, band, j3, rows3, rok3, lo, hi, hoff, poff, usize, size,
                tiles, row_stride, COLS: tl.constexpr, CONTIG: tl.constexpr, M: tl.constexpr, S: tl.constexpr,
                TWEAK: tl.constexpr, TILED: tl.constexpr, HAS_W: tl.constexpr, HAS_C: tl.constexpr,
                HAS_O: tl.constexpr, O_IS_C: tl.constexpr, MU: tl.constexpr):
    # Every load of one step of sketch_kernel at once (PREFETCH): the gradient [BR, Q, BM] and the preparations
    # [1, Q, BM], as _side_places places them. What a step does not read comes back as the gradient (unused).
    gptr, gok, ep, okp = _side_places(g_ptr, tb, t1, tq, band, j3, rows3, rok3, lo, hi, hoff, size, tiles, row_stride,
                                      COLS, CONTIG, M, S, TWEAK, TILED)
    x = tl.load(gptr, mask=gok, other=0.0)
    u0 = x
    u1 = x
    wv = x
    cen = x
    ov = x
    if MU >= 1:
        u0 = _at(x, u_ptr + poff, ep, okp, False)
    if MU >= 2:
        u1 = _at(x, u_ptr + usize + poff, ep, okp, False)
    if HAS_W:
        wv = _at(x, w_ptr + poff, ep, okp, False)
    if HAS_C:
        cen = _at(x, c_ptr + poff, ep, okp, False)
    if HAS_O and not O_IS_C:
        ov = _at(x, o_ptr + poff, ep, okp, False)
    return x, u0, u1, wv, cen, ov


@triton.jit
def tile_order_kernel(x_ptr, keys_ptr, size, tiles, M: tl.constexpr, BM: tl.constexpr, TP: tl.constexpr,
                      TWEAK: tl.constexpr, INVERSE: tl.constexpr):
    # In place on x [L, H, size] (size = tiles·M, contiguous): program (chunk, h, l) moves tiles [chunk·TP, +TP) of
    # row (l, h) into the order in which sketch_kernel's rotated tile reads them, stored[t·M + j] =
    # x[t·M + (j − c_t) mod M] (band 0's shifts), or back (INVERSE). A tile is read whole before any of it is written.
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + h
    lo = tl.load(keys_ptr + 2 * h).to(tl.uint32)
    hi = tl.load(keys_ptr + 2 * h + 1).to(tl.uint32)
    t = chunk * TP + tl.arange(0, TP)
    j = tl.arange(0, BM)[None, :]
    c = (_hash(t.to(tl.uint32), lo, hi ^ TWEAK) % M).to(tl.int32)[:, None]
    ok = (j < M) & (t < tiles)[:, None]
    stored = row * size + t[:, None] * M + j
    natural = row * size + t[:, None] * M + (j - c + M) % M
    if INVERSE:
        v = tl.load(x_ptr + stored, mask=ok)
        tl.debug_barrier()
        tl.store(x_ptr + natural, v, mask=ok)
    else:
        v = tl.load(x_ptr + natural, mask=ok)
        tl.debug_barrier()
        tl.store(x_ptr + stored, v, mask=ok)


@triton.jit
def finish_kernel(part_ptr, rc_ptr, c2_ptr, usc_ptr, res_ptr, chunks, n, H, allowance, M: tl.constexpr, BM: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
                  MU: tl.constexpr, CENTRING: tl.constexpr, U_SC: tl.constexpr, CH: tl.constexpr):
    # One program per (row, head block): the side kernel's partial sums over column chunks, CH chunks a step (the
    # loads of a step in flight together; one chunk a step waited for each load in turn), in a fixed order,
    # then (CENTRING) scaled centring, ṽ = (v − c) − γc with γ = ⟨v − c, c⟩/‖c‖², as
    # sketch_scores.scale_centring computes it, and the conflict scalars times their block's scale. Each (row, head
    # block) writes one row of res [n, H, S·M + 3 + MU]: the sketch, ‖ṽ‖², cross, own (γ where centring), the dots.
    W: tl.constexpr = S * BM + 3 + MU
    R: tl.constexpr = S * M + 3 + MU
    pid = tl.program_id(0)
    r = pid // H
    h = pid % H
    b = tl.arange(0, SP)[:, None]
    j = tl.arange(0, BM)[None, :]
    ok = (b < S) & (j < M)
    vec = tl.zeros((SP, BM), dtype=tl.float32)
    norm2 = tl.full((), 0.0, tl.float32)
    cross = tl.full((), 0.0, tl.float32)
    own = tl.full((), 0.0, tl.float32)
    d0 = tl.full((), 0.0, tl.float32)
    d1 = tl.full((), 0.0, tl.float32)
    for c0 in range(0, chunks, CH):
        cs = c0 + tl.arange(0, CH)
        cok = cs < chunks
        base = ((cs * n + r) * H + h).to(tl.int64) * W  # [CH]
        vec += tl.sum(tl.load(part_ptr + base[:, None, None] + (b * BM + j)[None, :, :],
                              mask=cok[:, None, None] & ok[None, :, :], other=0.0), axis=0)
        norm2 += tl.sum(tl.load(part_ptr + base + S * BM, mask=cok, other=0.0))
        cross += tl.sum(tl.load(part_ptr + base + S * BM + 1, mask=cok, other=0.0))
        own += tl.sum(tl.load(part_ptr + base + S * BM + 2, mask=cok, other=0.0))
        if MU >= 1:
            d0 += tl.sum(tl.load(part_ptr + base + S * BM + 3, mask=cok, other=0.0))
        if MU >= 2:
            d1 += tl.sum(tl.load(part_ptr + base + S * BM + 4, mask=cok, other=0.0))
    k_off = b * M + j  # the k-vector's entry of band b, row j
    if CENTRING:
        c2 = tl.load(c2_ptr + h)
        gamma = tl.where(c2 > 0, own / tl.where(c2 > 0, tl.maximum(c2, 1.1754943508222875e-38), 1.0), 0.0)
        extra = allowance * (norm2 + gamma * gamma * c2)
        norm2 = tl.maximum(norm2 - gamma * own, 0.0) + extra
        vec = vec - gamma * tl.load(rc_ptr + h.to(tl.int64) * (S * M) + k_off, mask=ok, other=0.0)
        own = gamma
    row = res_ptr + pid.to(tl.int64) * R
    tl.store(row + k_off, vec, mask=ok)
    tl.store(row + S * M, norm2)
    tl.store(row + S * M + 1, cross)
    tl.store(row + S * M + 2, own)
    if MU >= 1:
        if U_SC:
            d0 = d0 * tl.load(usc_ptr + h)
        tl.store(row + S * M + 3, d0)
    if MU >= 2:
        if U_SC:
            d1 = d1 * tl.load(usc_ptr + H + h)
        tl.store(row + S * M + 4, d1)


@triton.jit
def welford_kernel(g_ptr, mean_ptr, m2_ptr, sabs_ptr, sg_ptr, sh_ptr, n, N, stride_n, count, key0, key1, counts_ptr,
                   BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_M2: tl.constexpr, HAS_ABS: tl.constexpr,
                   HAS_SUM: tl.constexpr, HAS_HALF: tl.constexpr, ROUND_ABS: tl.constexpr, ROUND_SIGNED: tl.constexpr,
                   ABS_SLOT: tl.constexpr, SUM_SLOT: tl.constexpr, HALF_SLOT: tl.constexpr, WORDS: tl.constexpr,
                   FROM_MEMORY: tl.constexpr):
    # key0, key1: hashing.count_key of this update for the two random words (int32 bit patterns); FROM_MEMORY: count,
    # key0 and key1 are read from counts_ptr (int64 [3]) instead, so that a recorded launch serves every batch
    if FROM_MEMORY:
        count = tl.load(counts_ptr)
        key0 = tl.load(counts_ptr + 1).to(tl.int32)
        key1 = tl.load(counts_ptr + 2).to(tl.int32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    dt = mean_ptr.dtype.element_ty  # the statistics' dtype (a placeholder of it where the mean is not kept)
    sx = tl.zeros((BLOCK,), dtype=dt)
    sa = tl.zeros((BLOCK,), dtype=dt)
    sg = tl.zeros((BLOCK,), dtype=dt)
    sh = tl.zeros((BLOCK,), dtype=dt)
    for r in range(n):
        g = tl.load(g_ptr + r * stride_n + offs, mask=ok, other=0.0).to(dt)
        if HAS_MEAN:
            sx += g * g
        if HAS_ABS:
            sa += tl.abs(g)
        if HAS_SUM:
            sg += g
        if HAS_HALF:  # the samples at even positions of the stream (count + r even)
            sh += g * ((count + r + 1) % 2)
    nf = n + tl.zeros((BLOCK,), dtype=dt)  # n, count may arrive as constexpr ints (Triton specialises 1)
    cf = count + tl.zeros((BLOCK,), dtype=dt)
    if HAS_MEAN:
        mb = sx / nf
        mean = tl.load(mean_ptr + offs, mask=ok, other=0.0)
        delta = mb - mean
        tl.store(mean_ptr + offs, mean + delta * (nf / (cf + nf)), mask=ok)
        if HAS_M2:
            m2b = tl.zeros((BLOCK,), dtype=dt)
            for r in range(n):
                g = tl.load(g_ptr + r * stride_n + offs, mask=ok, other=0.0).to(dt)
                d = g * g - mb
                m2b += d * d
            m2 = tl.load(m2_ptr + offs, mask=ok, other=0.0)
            tl.store(m2_ptr + offs, m2 + m2b + delta * delta * (cf * nf / (cf + nf)), mask=ok)
    if WORDS >= 1:  # one word of random bits per entry for two rounded sums (hashing.rounding_slots)
        e = offs.to(tl.uint32)
        w0 = _fmix32(e ^ (key0 + tl.zeros((BLOCK,), tl.int32)).to(tl.uint32, bitcast=True))
        w1 = w0
        if WORDS >= 2:
            w1 = _fmix32(e ^ (key1 + tl.zeros((BLOCK,), tl.int32)).to(tl.uint32, bitcast=True))
    if HAS_ABS:
        va = tl.load(sabs_ptr + offs, mask=ok, other=0.0).to(dt) + sa
        if ROUND_ABS:  # a bf16 accumulator: stochastic rounding, the bits of hashing.round_bf16_stochastic
            va = _round_bf16(va, w0, w1, ABS_SLOT)
        tl.store(sabs_ptr + offs, va, mask=ok)
    if HAS_SUM:
        vs = tl.load(sg_ptr + offs, mask=ok, other=0.0).to(dt) + sg
        if ROUND_SIGNED:
            vs = _round_bf16(vs, w0, w1, SUM_SLOT)
        tl.store(sg_ptr + offs, vs, mask=ok)
    if HAS_HALF:
        vh = tl.load(sh_ptr + offs, mask=ok, other=0.0).to(dt) + sh
        if ROUND_SIGNED:
            vh = _round_bf16(vh, w0, w1, HALF_SLOT)
        tl.store(sh_ptr + offs, vh, mask=ok)


@triton.jit
def _round_bf16(v, w0, w1, SLOT: tl.constexpr):
    """``v`` rounded to bf16 up or down at random (unbiased): hashing.round_bf16_stochastic's bits, half of word 0
    (slots 0, 1) or of word 1 (slot 2)."""
    if SLOT == 0:
        noise = w0 & 0xFFFF
    elif SLOT == 1:
        noise = w0 >> 16
    else:
        noise = w1 & 0xFFFF
    bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
