"""Every use of Numba's internals, in one place.

fastlstm reaches below Numba's public API in four ways: LLVM-level array structs
(``make_array``, ``populate_array``, ``cgutils``) for views and atomics written as
intrinsics, ``impl_ret_borrowed`` for a view that shares its parent's reference, the
cache's locator classes (to find where Numba caches a file's functions, see
``_config.follow``), and a compiled overload's entry point (``entry_point``: a stream's
step called without the dispatcher). These names have moved between Numba releases, which is why
``pyproject.toml`` bounds ``numba`` from above and CI tests that bound.
"""
import platform

from llvmlite import ir
from numba import types
from numba.core import caching, cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

__all__ = ["cgutils", "make_array", "intrinsic", "make_view", "cache_locators", "entry_point",
           "NumbaIRAssumptionWarning", "flush_denormals", "restore_fp", "int64_pointer"]


def cache_locators():
    """Numba's cache locator classes, in the order it tries them."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    return impl._locator_classes


def entry_point(dispatcher, *args):
    """The compiled function `dispatcher` runs for arguments of exactly the types of
    `args` (compiled already), to be called without the dispatcher: its type checks
    cost about 0.05 us an argument (0.22 of a 2.1 us stream step at H = 64). None when
    there is none. Nothing checks what it is given: its caller passes arguments of
    exactly these types."""
    from numba import typeof
    cres = dispatcher.overloads.get(tuple(typeof(a) for a in args))
    return None if cres is None else cres.entry_point


def make_view(counted):
    """An intrinsic ``_view(flat, offset, shape)``: flat[offset:offset + prod(shape)]
    .reshape(shape) for a contiguous 1-D flat, written as the array's struct directly
    (Numba's reshape calls a C helper on every view, and carving ~50 views cost ~0.6 us
    per kernel call with it). `counted` False leaves the view without the flat's
    reference count: inside a kernel entry the caller holds the flat alive, and each
    counted view costs an atomic increment and decrement on every slice taken of it
    (hundreds per call). Views that are returned to Python must be counted."""

    @intrinsic
    def _view(typingctx, flat, offset, shape):
        ndim = len(shape)
        retty = types.Array(flat.dtype, ndim, "C")

        def codegen(context, builder, sig, args):
            src = make_array(sig.args[0])(context, builder, args[0])
            out = make_array(retty)(context, builder)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
                context.get_data_type(flat.dtype)))
            dims = cgutils.unpack_tuple(builder, args[2], ndim)
            strides, acc = [], itemsize
            for d in reversed(dims):             # C order
                strides.insert(0, acc)
                acc = builder.mul(acc, d)
            populate_array(out, data=builder.gep(src.data, [args[1]]),
                           shape=cgutils.pack_array(builder, dims),
                           strides=cgutils.pack_array(builder, strides), itemsize=itemsize,
                           meminfo=src.meminfo if counted else None,
                           parent=src.parent if counted else None)
            if counted:
                return impl_ret_borrowed(context, builder, retty, out._getvalue())
            return out._getvalue()
        return retty(flat, offset, shape), codegen
    return _view


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _mxcsr(builder, name, ptr):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(),
                                                                        [ptr.type]), name)
    builder.call(fn, [ptr])


@intrinsic
def flush_denormals(typingctx):
    """Set this thread's SSE control (MXCSR) to flush subnormal results to zero and read
    subnormal inputs as zero; returns the previous value for ``restore_fp``. Gradients
    carried back over many steps from one step's loss decay into subnormals, and every
    operation on one costs about a hundred cycles: at long (B=8, T=1000, H=64, float32)
    a backward from the last step took 35 ms instead of 9. (oneDNN, under torch.nn.LSTM,
    does the same.) A no-op returning -1 off x86."""
    def codegen(context, builder, sig, args):
        if not _X86:
            return context.get_constant(types.int64, -1)
        i32 = ir.IntType(32)
        old, new = cgutils.alloca_once(builder, i32), cgutils.alloca_once(builder, i32)
        _mxcsr(builder, "llvm.x86.sse.stmxcsr", old)
        value = builder.load(old)
        builder.store(builder.or_(value, i32(0x8040)), new)      # FTZ (bit 15), DAZ (bit 6)
        _mxcsr(builder, "llvm.x86.sse.ldmxcsr", new)
        return builder.zext(value, ir.IntType(64))
    return types.int64(), codegen


@intrinsic
def restore_fp(typingctx, old):
    """Put back the MXCSR value ``flush_denormals`` returned."""
    def codegen(context, builder, sig, args):
        if _X86:
            i32 = ir.IntType(32)
            ptr = cgutils.alloca_once(builder, i32)
            builder.store(builder.trunc(args[0], i32), ptr)
            _mxcsr(builder, "llvm.x86.sse.ldmxcsr", ptr)
        return context.get_dummy_value()
    return types.void(types.int64), codegen


@intrinsic
def int64_pointer(typingctx, address):
    """The int64 address (e.g. an array's ``ctypes.data``) as a pointer to int64, for
    ``numba.carray`` in a cfunc that is handed addresses rather than arrays."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
    return types.CPointer(types.int64)(types.int64), codegen
