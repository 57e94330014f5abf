"""The layer's own matrix products, where OpenBLAS's cost more than their arithmetic:
the recurrent product of each step from pre-packed weights (``packed_product``), the
weight gradients from dz's rows in place (``gradient_product``) and the products with
a narrow right-hand side (``narrow_product``); each has a ``*_pays`` rule that says
when it beats BLAS.

Every step multiplies a few rows of h by the same W_hh. OpenBLAS packs its right-hand
operand into panels on every call: at medium size (32 rows of h per part of the batch,
W_hh^T 256 x 1024 float32) that repacking made the per-step products take 48-60 ms of a
fwd+bwd against 37 ms for the same multiply-adds as one GEMM over all rows
(``fastlstm bench --profile``). Here the weights are packed once per call, into panels
of NR columns (four SIMD vectors: 64 float32 or 32 float64), k-major:

    packed[p, k, :] = B[k, p * NR:(p + 1) * NR]

and each step runs a register-blocked micro-kernel over them: MR (<= 4) rows of A times
one panel, MR x 4 vector accumulators kept in registers over the whole k loop, one
broadcast of A and one fused multiply-add per accumulator and k. It is written in LLVM
IR (through Numba's ``intrinsic``) because Numba cannot keep an accumulator tile in
registers across a loop: written as loops over arrays, LLVM loads and stores C on every k.
"""
from llvmlite import ir
from numba import njit, types
from numba.extending import register_jitable

from ._config import JIT
from ._numba_ext import cgutils, intrinsic, make_array

__all__ = ["panel_width", "pack_panels", "pack_panels_transposed", "packed_product",
           "gradient_product", "gradient_product_pays", "narrow_product", "narrow_pays",
           "row_dots"]

#: bytes of one SIMD vector the micro-kernel works in (AVX-512; LLVM splits the
#: vectors on machines with narrower ones, which still computes the right thing)
VECTOR_BYTES = 64
#: SIMD vectors per panel, and the most rows one micro-kernel call handles
NV, MR = 4, 4


@register_jitable     # plain Python when Python calls it (the layer sizes its segments by it)
def panel_width(itemsize):
    """NR: the columns of one packed panel."""
    return NV * VECTOR_BYTES // itemsize


@njit(inline="always", **JIT)
def pack_panels(b, packed):
    """packed (N // NR, K, NR) <- b (K, N), N a multiple of NR."""
    K = b.shape[0]
    NR = packed.shape[2]
    for p in range(packed.shape[0]):
        for k in range(K):
            src = b[k, p * NR:(p + 1) * NR]
            dst = packed[p, k]
            for c in range(NR):
                dst[c] = src[c]


#: k per block of pack_panels_transposed: the block's NR rows of bt (one cache line each
#: at 16 float32) stay in L1 while its rows of the panel are written whole
PACK_K = 16


@njit(inline="always", **JIT)
def pack_panels_transposed(bt, packed):
    """packed (N // NR, K, NR) <- bt.T for bt (N, K): the panels of bt's transpose. In
    blocks of PACK_K values of k: a row of bt at a time, written down a panel's column
    with a stride of NR, ran at about 2 GB/s; the blocks write each panel row whole, from
    lines already in L1 (4096 x 1024 float32: 7.7 -> 2.7 ms)."""
    NR = packed.shape[2]
    K = bt.shape[1]
    for p in range(packed.shape[0]):
        for k0 in range(0, K, PACK_K):
            for k in range(k0, min(K, k0 + PACK_K)):
                dst = packed[p, k]
                for c in range(NR):
                    dst[c] = bt[p * NR + c, k]


def _micro_codegen(rows, nv=NV):
    """IR for C[0:rows, 0:NR] (+)= A[0:rows, 0:K] @ B[0:K, 0:NR], NR = nv vectors.

    Element (r, k) of A is at a_off + r * a_rs + k * a_ks: a row-major A has
    (a_rs, a_ks) = (lda, 1), the transpose of a row-major X (K, n) has (1, n).
    Row k of B starts at b_off + k * b_ks: a packed panel has b_ks = NR, a
    row-major matrix its row length. C is row-major with stride ldc. acc != 0 adds
    into C; otherwise C is overwritten (and never read)."""

    def codegen(context, builder, sig, args):
        a_ty, _, _, _, b_ty, _, _, c_ty = sig.args[:8]
        a_arr, a_off, a_rs, a_ks, b_arr, b_off, b_ks, c_arr, c_off, ldc, K, acc = args
        a = make_array(a_ty)(context, builder, a_arr)
        b = make_array(b_ty)(context, builder, b_arr)
        c = make_array(c_ty)(context, builder, c_arr)
        fty = context.get_data_type(a_ty.dtype)
        width = VECTOR_BYTES // context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, width)
        i64 = ir.IntType(64)
        a_ptr = builder.gep(a.data, [a_off])
        b_ptr = builder.gep(b.data, [b_off])
        c_ptr = builder.gep(c.data, [c_off])
        suffix = f"v{width}f{context.get_abi_sizeof(fty) * 8}"        # e.g. v16f32
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.{suffix}")
        zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * width)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)

        def c_vector(r, v):
            row = builder.gep(c_ptr, [builder.mul(ir.Constant(i64, r), ldc)])
            return builder.bitcast(builder.gep(row, [ir.Constant(i64, v * width)]),
                                   vty.as_pointer())

        entry = builder.basic_block
        loop = builder.append_basic_block("panel_k")
        done = builder.append_basic_block("panel_done")
        adding = builder.icmp_signed("!=", acc, ir.Constant(acc.type, 0))
        with builder.if_then(adding):        # C's old values, only when they are added to
            loaded_block = builder.basic_block
            loaded = [[builder.load(c_vector(r, v), align=4) for v in range(nv)]
                      for r in range(rows)]
        start = builder.basic_block
        init = []
        for r in range(rows):
            init.append([])
            for v in range(nv):
                phi = builder.phi(vty)
                phi.add_incoming(loaded[r][v], loaded_block)
                phi.add_incoming(zero, entry)
                init[r].append(phi)
        builder.cbranch(builder.icmp_signed(">", K, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        accs = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
        row = builder.gep(b_ptr, [builder.mul(k, b_ks)])
        bs = [builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, v * width)]),
                                           vty.as_pointer()), align=4)
              for v in range(nv)]
        a_k = builder.gep(a_ptr, [builder.mul(k, a_ks)])
        new = []
        for r in range(rows):
            x = builder.load(builder.gep(a_k, [builder.mul(ir.Constant(i64, r), a_rs)]))
            xs = builder.shuffle_vector(builder.insert_element(ir.Constant(vty, ir.Undefined),
                                                               x, ir.Constant(i64, 0)),
                                        ir.Constant(vty, ir.Undefined), splat_mask)
            new.append([builder.call(fma, [xs, bs[v], accs[r][v]]) for v in range(nv)])
        k_next = builder.add(k, ir.Constant(i64, 1))
        body_end = builder.basic_block
        builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)
        k.add_incoming(ir.Constant(i64, 0), start)
        k.add_incoming(k_next, body_end)
        for r in range(rows):
            for v in range(nv):
                accs[r][v].add_incoming(init[r][v], start)
                accs[r][v].add_incoming(new[r][v], body_end)

        builder.position_at_end(done)
        outs = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]   # phis first
        for r in range(rows):
            for v in range(nv):
                outs[r][v].add_incoming(init[r][v], start)
                outs[r][v].add_incoming(new[r][v], body_end)
        for r in range(rows):
            for v in range(nv):
                builder.store(outs[r][v], c_vector(r, v), align=4)
        return context.get_dummy_value()
    return codegen


def _make_micro(rows, nv=NV):
    @intrinsic
    def micro(typingctx, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, ldc, K, acc):
        i = types.int64
        return types.void(a, i, i, i, b, i, i, c, i, i, i, i), _micro_codegen(rows, nv)
    return micro


_micro1, _micro2, _micro3, _micro4 = (_make_micro(r) for r in (1, 2, 3, 4))


#: bytes of a's rows one block of the product keeps in L2 across all panels: without
#: blocks, a (6400, 512) float32 was read from memory once per panel, and the packed
#: input projection ran slower than OpenBLAS's. But never fewer than A_MIN_ROWS rows: at
#: K = 2048 that made blocks of 16 rows, and a step's product over 64 rows read the
#: whole W_hh^T (32 MB) four times (57 GF/s; 108 with one block, float32, one thread)
A_BLOCK_BYTES = 1 << 17
A_MIN_ROWS = 64
#: k per pass of the micro-kernel over a panel: its slice (K_PANEL x NR, 32 KB float32)
#: stays in L1 for every row group of the block. Over all of a long K the panel came from
#: L2 for each group of four rows: at (32, 2048) x (2048, 8192) 54 against 85 GF/s, at
#: (16, 1536) x (1536, 6144) 72 against 95 (float32, one thread); at K <= K_PANEL the
#: sums are the same as one pass's
K_PANEL = 128


@njit(inline="always", **JIT)
def packed_product(a, packed, c):
    """c (M, N) = a (M, K) @ b, for b packed by ``pack_panels`` (N // NR, K, NR); a and c
    C-contiguous."""
    M, K = a.shape
    NR = packed.shape[2]
    N = c.shape[1]
    rows = max(A_MIN_ROWS, A_BLOCK_BYTES // max(K * a.itemsize, 1)) // MR * MR
    for i0 in range(0, M, rows):
        i1 = min(M, i0 + rows)
        for p in range(packed.shape[0]):
            for k0 in range(0, K, K_PANEL):
                kn = min(K, k0 + K_PANEL) - k0
                add = 1 if k0 > 0 else 0
                p_off = p * K * NR + k0 * NR
                i = i0
                while i + MR <= i1:
                    _micro4(a, i * K + k0, K, 1, packed, p_off, NR, c, i * N + p * NR, N, kn,
                            add)
                    i += MR
                rest = i1 - i
                at, ct = i * K + k0, i * N + p * NR
                if rest == 3:
                    _micro3(a, at, K, 1, packed, p_off, NR, c, ct, N, kn, add)
                elif rest == 2:
                    _micro2(a, at, K, 1, packed, p_off, NR, c, ct, N, kn, add)
                elif rest == 1:
                    _micro1(a, at, K, 1, packed, p_off, NR, c, ct, N, kn, add)


#: rows of K (time steps x batch) per block of a weight-gradient product: B's panel
#: slice (K_BLOCK x NR) is read by every row group of A and stays in L1
K_BLOCK = 128


#: the largest C (bytes) for which gradient_product beats OpenBLAS on one thread: at
#: (256, 1024) float32 it ran 1.0-1.2x as fast, at (512, 2048) float32 0.8x
GRADIENT_C_BYTES = 1 << 20


@register_jitable
def gradient_product_pays(n, N, itemsize):
    """Whether a weight gradient (n, N) runs through gradient_product (else BLAS)."""
    return N % panel_width(itemsize) == 0 and n * N * itemsize <= GRADIENT_C_BYTES


@njit(inline="always", **JIT)
def gradient_product(a, b, c, acc):
    """c (n, N) = a.T @ b, or += when acc, for a (K, n) and b (K, N) C-contiguous, N a
    multiple of NR: a weight gradient X^T dZ over all rows, with neither operand
    packed (b's rows are read in place, a's columns broadcast from its rows)."""
    K, n = a.shape
    N = b.shape[1]
    NR = panel_width(a.itemsize)
    if K == 0 and not acc:
        c[:] = 0
    for k0 in range(0, K, K_BLOCK):
        kn = min(K, k0 + K_BLOCK) - k0
        add = 1 if acc or k0 > 0 else 0
        for p in range(N // NR):
            b_off = k0 * N + p * NR
            i = 0
            while i + MR <= n:
                _micro4(a, k0 * n + i, 1, n, b, b_off, N, c, i * N + p * NR, N, kn, add)
                i += MR
            rest = n - i
            if rest == 3:
                _micro3(a, k0 * n + i, 1, n, b, b_off, N, c, i * N + p * NR, N, kn, add)
            elif rest == 2:
                _micro2(a, k0 * n + i, 1, n, b, b_off, N, c, i * N + p * NR, N, kn, add)
            elif rest == 1:
                _micro1(a, k0 * n + i, 1, n, b, b_off, N, c, i * N + p * NR, N, kn, add)


@njit(inline="always", **JIT)
def narrow_pays(N, itemsize):
    """Whether narrow_product takes an (M, K) @ (K, N) product: N one, two or three
    SIMD vectors, fewer than a panel."""
    width = VECTOR_BYTES // itemsize
    return N % width == 0 and 0 < N < NV * width


def _narrow_rows(micro4, micro3, micro2, micro1):
    """c = a @ b row block by row block with the micro-kernels of one width (b read in
    place, one panel as wide as c), for narrow_product."""
    @njit(inline="always", **JIT)
    def rows(a, b, c):
        M, K = a.shape
        N = b.shape[1]
        i = 0
        while i + MR <= M:
            micro4(a, i * K, K, 1, b, 0, N, c, i * N, N, K, 0)
            i += MR
        rest = M - i
        if rest == 3:
            micro3(a, i * K, K, 1, b, 0, N, c, i * N, N, K, 0)
        elif rest == 2:
            micro2(a, i * K, K, 1, b, 0, N, c, i * N, N, K, 0)
        elif rest == 1:
            micro1(a, i * K, K, 1, b, 0, N, c, i * N, N, K, 0)
    return rows


_narrow1 = _narrow_rows(*(_make_micro(r, 1) for r in (4, 3, 2, 1)))
_narrow2 = _narrow_rows(*(_make_micro(r, 2) for r in (4, 3, 2, 1)))
_narrow3 = _narrow_rows(*(_make_micro(r, 3) for r in (4, 3, 2, 1)))


@njit(inline="always", **JIT)
def narrow_product(a, b, c):
    """c (M, N) = a (M, K) @ b (K, N), all C-contiguous, for N that ``narrow_pays``:
    one micro-kernel panel as wide as b, read in place (b is small and stays in L1).
    The backward's dx = dZ W_ih at I = 16 or 32 (float32): OpenBLAS ran (4000, 256) x
    (256, 16) at about 80 GF/s on one thread."""
    nv = b.shape[1] // (VECTOR_BYTES // a.itemsize)
    if nv == 1:
        _narrow1(a, b, c)
    elif nv == 2:
        _narrow2(a, b, c)
    else:
        _narrow3(a, b, c)


def _dot_rows_codegen(rows, seqs):
    """IR for out[o_off + r * o_stride + b * o_seq] = w[w_off + r * ld:... + K] .
    h[h_off + b * h_seq:... + K] for r < rows, b < seqs: each sum in a SIMD accumulator
    of its own (rows x seqs independent FMA chains, each weight vector loaded once for
    all seqs), ended by a sum across the lanes, and a scalar tail past the last
    whole step of the vector loop. w is float like h, or uint16 bfloat16 bit patterns with
    h float32, widened as loaded: for one or two seqs a pair of vectors a step (see
    `pairwise` below), else zero-extended and shifted up 16 bits."""

    def codegen(context, builder, sig, args):
        w_ty, h_ty, o_ty = sig.args[0], sig.args[3], sig.args[7]
        w_arr, w_off, ld, h_arr, h_off, h_seq, K, o_arr, o_off, o_stride, o_seq = args
        w = make_array(w_ty)(context, builder, w_arr)
        h = make_array(h_ty)(context, builder, h_arr)
        o = make_array(o_ty)(context, builder, o_arr)
        fty = context.get_data_type(h_ty.dtype)
        size = context.get_abi_sizeof(fty)
        width = VECTOR_BYTES // size
        vty = ir.VectorType(fty, width)
        i64 = ir.IntType(64)
        bf16 = w_ty.dtype == types.uint16
        suffix = f"v{width}f{size * 8}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.{suffix}")
        sfma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fty, [fty] * 3),
                                              f"llvm.fma.f{size * 8}")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fty, [fty, vty]),
                                                f"llvm.vector.reduce.fadd.{suffix}")
        zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * width)
        w_rows = [builder.gep(w.data, [builder.add(w_off, builder.mul(ir.Constant(i64, r), ld))])
                  for r in range(rows)]
        h_rows = [builder.gep(h.data, [builder.add(h_off, builder.mul(ir.Constant(i64, b),
                                                                      h_seq))])
                  for b in range(seqs)]
        # bfloat16 for one or two sequences: two vectors a step, from one load of 2 x
        # width weights as width 32-bit pairs: the even ones shifted up, the odd ones
        # masked (one op a vector, against a zero-extension and a shift), h's even and
        # odd elements taken apart to match (a shuffle per vector of h, shared by the
        # rows). A 512 x 256 product in L2, 8 rows x 1: 4.0 -> 3.0 us; at four
        # sequences the shuffles cost more than they save (H = 1024, B = 4: 9.3 -> 9.9 ms)
        pairwise = bf16 and seqs <= 2
        step = 2 * width if pairwise else width
        kv = builder.mul(builder.sdiv(K, ir.Constant(i64, step)), ir.Constant(i64, step))
        pairs = [(r, b) for r in range(rows) for b in range(seqs)]

        def load_w(r, k, vector):
            p = builder.gep(w_rows[r], [k])
            if not bf16:
                if vector:
                    return builder.load(builder.bitcast(p, vty.as_pointer()), align=4)
                return builder.load(p)
            i16, i32 = ir.IntType(16), ir.IntType(32)
            if vector:
                bits = builder.load(builder.bitcast(p, ir.VectorType(i16, width).as_pointer()),
                                    align=2)
                wide = builder.zext(bits, ir.VectorType(i32, width))
                wide = builder.shl(wide, ir.Constant(ir.VectorType(i32, width), [16] * width))
                return builder.bitcast(wide, vty)
            wide = builder.shl(builder.zext(builder.load(p), i32), ir.Constant(i32, 16))
            return builder.bitcast(wide, fty)

        entry = builder.basic_block
        loop = builder.append_basic_block("dot_k")
        after = builder.append_basic_block("dot_after")
        builder.cbranch(builder.icmp_signed(">", kv, ir.Constant(i64, 0)), loop, after)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        accs = [builder.phi(vty) for _ in pairs]
        def load_h(b, at):
            return builder.load(builder.bitcast(builder.gep(h_rows[b], [at]), vty.as_pointer()),
                                align=4)

        if not pairwise:
            hv = [load_h(b, k) for b in range(seqs)]
            wv = [load_w(r, k, True) for r in range(rows)]
            new = [builder.call(fma, [wv[r], hv[b], accs[q]]) for q, (r, b) in enumerate(pairs)]
        else:
            i32v = ir.VectorType(ir.IntType(32), width)
            even = ir.Constant(i32v, list(range(0, step, 2)))
            odd = ir.Constant(i32v, list(range(1, step, 2)))
            he, ho = [], []
            for b in range(seqs):
                lo, hi = load_h(b, k), load_h(b, builder.add(k, ir.Constant(i64, width)))
                he.append(builder.shuffle_vector(lo, hi, even))
                ho.append(builder.shuffle_vector(lo, hi, odd))
            we, wo = [], []
            for r in range(rows):
                d = builder.load(builder.bitcast(builder.gep(w_rows[r], [k]),
                                                 i32v.as_pointer()), align=2)
                we.append(builder.bitcast(builder.shl(d, ir.Constant(i32v, [16] * width)), vty))
                wo.append(builder.bitcast(builder.and_(d, ir.Constant(i32v, [-65536] * width)),
                                          vty))
            new = [builder.call(fma, [wo[r], ho[b], builder.call(fma, [we[r], he[b], accs[q]])])
                   for q, (r, b) in enumerate(pairs)]
        k_next = builder.add(k, ir.Constant(i64, step))
        end = builder.basic_block
        builder.cbranch(builder.icmp_signed("<", k_next, kv), loop, after)
        k.add_incoming(ir.Constant(i64, 0), entry)
        k.add_incoming(k_next, end)
        for q in range(len(pairs)):
            accs[q].add_incoming(zero, entry)
            accs[q].add_incoming(new[q], end)
        builder.position_at_end(after)
        sums = [builder.phi(vty) for _ in pairs]
        for q in range(len(pairs)):
            sums[q].add_incoming(zero, entry)
            sums[q].add_incoming(new[q], end)
        # the sum across the lanes in whatever tree LLVM picks (reassoc, as the kernels'
        # fastmath flags allow everywhere else), fixed for a compiled kernel: an ordered
        # one, a chain of `width` dependent adds per sum, was about a third of a row's
        # time at K = 256 (eight rows of 256 in L2, float32: 3.5 -> 2.3 us; bfloat16, 2
        # MB: 52.9 -> 43.4 us)
        sums = [builder.call(reduce, [ir.Constant(fty, -0.0), v], fastmath=("reassoc",))
                for v in sums]
        tail = builder.append_basic_block("dot_tail")
        done = builder.append_basic_block("dot_done")
        head = builder.basic_block
        builder.cbranch(builder.icmp_signed("<", kv, K), tail, done)
        builder.position_at_end(tail)
        kt = builder.phi(i64)
        ts = [builder.phi(fty) for _ in pairs]
        hs = [builder.load(builder.gep(h_rows[b], [kt])) for b in range(seqs)]
        ws = [load_w(r, kt, False) for r in range(rows)]
        tnew = [builder.call(sfma, [ws[r], hs[b], ts[q]]) for q, (r, b) in enumerate(pairs)]
        kt_next = builder.add(kt, ir.Constant(i64, 1))
        tend = builder.basic_block
        builder.cbranch(builder.icmp_signed("<", kt_next, K), tail, done)
        kt.add_incoming(kv, head)
        kt.add_incoming(kt_next, tend)
        for q in range(len(pairs)):
            ts[q].add_incoming(sums[q], head)
            ts[q].add_incoming(tnew[q], tend)
        builder.position_at_end(done)
        totals = [builder.phi(fty) for _ in pairs]        # phis first
        for q in range(len(pairs)):
            totals[q].add_incoming(sums[q], head)
            totals[q].add_incoming(tnew[q], tend)
        for q, (r, b) in enumerate(pairs):
            at = builder.add(o_off, builder.add(builder.mul(ir.Constant(i64, r), o_stride),
                                                builder.mul(ir.Constant(i64, b), o_seq)))
            builder.store(totals[q], builder.gep(o.data, [at]))
        return context.get_dummy_value()
    return codegen


def _make_dot_rows(rows, seqs):
    @intrinsic
    def dot_rows(typingctx, w, w_off, ld, h, h_off, h_seq, K, out, o_off, o_stride, o_seq):
        i = types.int64
        return (types.void(w, i, i, h, i, i, i, out, i, i, i),
                _dot_rows_codegen(rows, seqs))
    return dot_rows


#: the row dot products' shapes (rows x sequences): eight independent FMA chains keep
#: both FMA units busy (one row's chain is latency-bound); with several sequences each
#: weight vector, widened once, feeds one chain per sequence
dot_rows8 = _make_dot_rows(8, 1)
dot_rows4x2 = _make_dot_rows(4, 2)
dot_rows2x4 = _make_dot_rows(2, 4)
dot_rows1 = _make_dot_rows(1, 1)


@njit(inline="always", **JIT)
def row_dots(w, at, K, R, h, out):
    """out[b, r] = h[b] . w[at + r K:at + (r + 1) K] for r < R, b < B = h.shape[0]: two
    rows by four sequences, four by two or eight by one a call (eight sums in registers,
    each weight vector loaded, and widened from bfloat16, once for the call's
    sequences). h (B, >= K) and out (B, >= R) C-contiguous."""
    B, hs, os = h.shape[0], h.shape[1], out.shape[1]
    b = 0
    while b < B:
        nb = 4 if B - b >= 4 else (2 if B - b >= 2 else 1)
        rows = 2 if nb == 4 else (4 if nb == 2 else 8)
        r = 0
        while r + rows <= R:
            if nb == 4:
                dot_rows2x4(w, at + r * K, K, h, b * hs, hs, K, out, b * os + r, 1, os)
            elif nb == 2:
                dot_rows4x2(w, at + r * K, K, h, b * hs, hs, K, out, b * os + r, 1, os)
            else:
                dot_rows8(w, at + r * K, K, h, b * hs, hs, K, out, b * os + r, 1, os)
            r += rows
        while r < R:
            for q in range(b, b + nb):
                dot_rows1(w, at + r * K, K, h, q * hs, hs, K, out, q * os + r, 1, os)
            r += 1
        b += nb
