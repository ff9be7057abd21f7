"""Vector lanes for the numba kernels: a float64 vector of :data:`WIDTH` lanes held in registers.

A sum whose order is fixed (the penalty's loss sums, added in lanes by column: pair_kernels)
cannot be vectorised by LLVM: without reassociation it keeps the adds in order, one chain, and a
lane array in memory pays a store and a reload per block. A local of :class:`LanesType` is an
LLVM ``<WIDTH x double>`` value, so a loop that adds a block of ``WIDTH`` values to it per
iteration keeps it in vector registers: lane ``i`` still adds its values one after the other, in
order, so the sums are the very bits of the scalar loop (tests/test_covariance.py), at a ninth of
its time (0.076 vs 0.67 ns per value, measured on a loop over 1024 values).

Loads read ``WIDTH`` consecutive values from ``a[j]`` on: the caller keeps ``j + WIDTH`` within
the array (no bounds check, as numba's own indexing).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["WIDTH", "LanesType", "lanes_abs", "lanes_add", "lanes_get", "lanes_load", "lanes_over", "lanes_sq",
           "lanes_store", "lanes_zero"]

WIDTH = 16
_VEC = ir.VectorType(ir.DoubleType(), WIDTH)


class LanesType(types.Type):
    """``WIDTH`` float64 lanes in one LLVM vector (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(name=f"Lanes{WIDTH}")


lanes_type = LanesType()


@register_model(LanesType)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


def _load(context, builder, aryty, ary, j):
    """``WIDTH`` values of a float64 array from ``j`` on, as one vector (float32 ones widened)."""
    data = context.make_array(aryty)(context, builder, ary).data
    elem = context.get_value_type(aryty.dtype)
    vty = ir.VectorType(elem, WIDTH)
    v = builder.load(builder.bitcast(builder.gep(data, [j]), vty.as_pointer()), align=context.get_abi_sizeof(elem))
    return v if aryty.dtype == types.float64 else builder.fpext(v, _VEC)


def _check_array(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype in (types.float64,
                                                                                           types.float32)


@intrinsic
def lanes_zero(typingctx):
    """All lanes 0.0."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VEC, [0.0] * WIDTH)
    return lanes_type(), codegen


@intrinsic
def lanes_load(typingctx, a, j):
    """The lanes from ``a[j : j + WIDTH]`` (float64 or float32, contiguous)."""
    if not _check_array(a):
        return None

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig.args[0], args[0], args[1])
    return lanes_type(a, j), codegen


@intrinsic
def lanes_store(typingctx, acc, a, j):
    """``a[j : j + WIDTH] = acc`` (``a`` float64, contiguous)."""
    if not (isinstance(acc, LanesType) and _check_array(a) and a.dtype == types.float64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        builder.store(args[0], builder.bitcast(builder.gep(data, [args[2]]), _VEC.as_pointer()), align=8)
        return context.get_dummy_value()
    return types.none(acc, a, j), codegen


def _binary(op):
    """An intrinsic ``acc (+) f(a[j : j + WIDTH])`` for ``op(builder, context, r) -> f(r)``."""
    def typer(typingctx, acc, a, j):
        if not (isinstance(acc, LanesType) and _check_array(a)):
            return None

        def codegen(context, builder, sig, args):
            r = _load(context, builder, sig.args[1], args[1], args[2])
            return builder.fadd(args[0], op(builder, r))
        return lanes_type(acc, a, j), codegen
    return intrinsic(typer)


def _fabs(builder, r):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC]), f"llvm.fabs.v{WIDTH}f64")
    return builder.call(fn, [r])


# Each lane adds its value after the ones before it: the scalar ``lane += f(x)`` (fmul then fadd,
# never contracted to an fma, as numba compiles the scalar loop).
lanes_add = _binary(lambda builder, r: r)
lanes_add.__doc__ = "``acc + a[j : j + WIDTH]``, lane by lane."
lanes_sq = _binary(lambda builder, r: builder.fmul(r, r))
lanes_sq.__doc__ = "``acc + a[j : j + WIDTH] ** 2``, lane by lane (the square rounded, then added)."
lanes_abs = _binary(_fabs)
lanes_abs.__doc__ = "``acc + |a[j : j + WIDTH]|``, lane by lane."


@intrinsic
def lanes_get(typingctx, acc, i):
    """Lane ``i``."""
    if not isinstance(acc, LanesType):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])
    return types.float64(acc, i), codegen


@intrinsic
def lanes_over(typingctx, a, j, bound):
    """How many of ``a[j : j + WIDTH]`` are NaN or have ``|x| > bound``, i.e. not ``|x| <= bound``."""
    if not _check_array(a):
        return None

    def codegen(context, builder, sig, args):
        r = _fabs(builder, _load(context, builder, sig.args[0], args[0], args[1]))
        b = context.cast(builder, args[2], sig.args[2], types.float64)
        first = builder.insert_element(ir.Constant(_VEC, None), b, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(first, ir.Constant(_VEC, None),
                                       ir.Constant(ir.VectorType(ir.IntType(32), WIDTH), [0] * WIDTH))
        over = builder.fcmp_unordered(">", r, splat)  # true for NaN too
        bits = builder.bitcast(over, ir.IntType(WIDTH))
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(WIDTH), [ir.IntType(WIDTH)]),
                                               f"llvm.ctpop.i{WIDTH}")
        return builder.zext(builder.call(ctpop, [bits]), ir.IntType(64))
    return types.int64(a, j, bound), codegen
