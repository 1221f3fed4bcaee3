"""BLAS/LAPACK from SciPy's Cython tables, called through ctypes without the GIL, on the lower
triangles of C-contiguous ``(C, C)`` float32/float64 matrices given by address.

Used by the CPU paths of :mod:`adlib.kernels.gaussian`: the covariance's rank-1 update (syrk),
its Cholesky factor (potrf, with lacpy/laset around it) and the triangular solves of the
Mahalanobis distance (trsm), one call per position, in threads.

Binding a raw function pointer is safe only while the routine takes exactly the arguments passed
here, so the signatures are checked once, on first use (:func:`lapack_available`): each entry of
SciPy's ``__pyx_capi__`` tables is a PyCapsule whose name is the routine's C signature, e.g.
``"void (char *, int *, <s> *, int *, int *)"`` for ``spotrf`` (``<s>``: SciPy's Cython typedef of
float, its name mangled by module). A missing table or entry, another signature (an ILP64 build
declares other integers) or a C ``int`` of other than 4 bytes turns this layer off: the kernels
then run their torch paths, with one warning that says why. ``ADLIB_NO_CTYPES=1`` turns it off
without a warning (:func:`adlib.settings.ctypes_disabled`).
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
import warnings
from typing import Callable

import numpy as np

from ..settings import ctypes_disabled

# The C signature of every routine bound here, ``{r}`` the real type (float for the ``s``
# routines, double for ``d``), as SciPy declares them: every argument a pointer (Fortran
# convention), in the order LowerTriangles passes them. The argument count comes from here too.
_SIGNATURES = {
    "potrf": "void (char *, int *, {r} *, int *, int *)",
    "syrk": "void (char *, char *, int *, int *, {r} *, {r} *, int *, {r} *, {r} *, int *)",
    "trsm": "void (char *, char *, char *, char *, int *, int *, {r} *, {r} *, int *, {r} *, int *)",
    "lacpy": "void (char *, int *, int *, {r} *, int *, {r} *, int *)",
    "laset": "void (char *, int *, int *, {r} *, {r} *, {r} *, int *)",
}
_BLAS_ROUTINES = ("syrk", "trsm")           # in cython_blas; the others in cython_lapack
_REALS = {"s": "float", "d": "double"}
# SciPy's real types are Cython typedefs (``ctypedef float s``); a capsule name spells them
# mangled by module, e.g. ``__pyx_t_5scipy_6linalg_11cython_blas_s``
_SCIPY_TYPEDEF = re.compile(r"__pyx_t_\w*?cython_(?:blas|lapack)_([sd])\b")


def _table(routine: str):
    """SciPy's Cython table (module) that holds ``routine`` (``"potrf"``, ``"syrk"``, ...)."""
    from scipy.linalg import cython_blas, cython_lapack
    return cython_blas if routine in _BLAS_ROUTINES else cython_lapack


def _capsule_name(capsule: object) -> str | None:
    """A PyCapsule's name (in SciPy's tables: the C signature); the C API's error (raised) for
    anything that is not a capsule."""
    # own prototype: setting argtypes on ctypes.pythonapi's functions would change them for everyone
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    name = get_name(capsule)
    return None if name is None else name.decode()


def _normalized(signature: str) -> str:
    """A capsule's signature with SciPy's mangled real typedefs spelled ``float`` / ``double``."""
    return _SCIPY_TYPEDEF.sub(lambda match: _REALS[match.group(1)], signature)


def _signature_problem() -> str | None:
    """Why the routines cannot be called through ctypes here, or None when every one of them
    (``s`` and ``d`` variants of :data:`_SIGNATURES`) has the expected signature."""
    if ctypes.sizeof(ctypes.c_int) != 4:
        return f"C int is {ctypes.sizeof(ctypes.c_int)} bytes, not 4"
    for routine, expected in _SIGNATURES.items():
        for prefix, real in _REALS.items():
            name = prefix + routine
            try:
                table = _table(routine)
                found = _capsule_name(table.__pyx_capi__[name])
            except Exception as err:  # noqa: BLE001 - any failure means: do not bind
                return f"SciPy's Cython table entry {name} is not readable ({type(err).__name__}: {err})"
            want = expected.format(r=real)
            if found is None or _normalized(found) != want:
                return f"{table.__name__}.{name} has signature {found!r}, adlib passes {want!r}"
    return None


_check_lock = threading.Lock()
_check_result: bool | None = None    # None: not checked yet


def _signatures_ok() -> bool:
    """:func:`_signature_problem` is None; checked once per process, with one warning if not."""
    global _check_result
    if _check_result is None:
        with _check_lock:
            if _check_result is None:
                problem = _signature_problem()
                if problem is not None:
                    warnings.warn(f"adlib.kernels: {problem}; the kernels use torch's linear algebra instead of "
                                  f"SciPy's BLAS/LAPACK through ctypes (same results, other speed)",
                                  RuntimeWarning, stacklevel=3)
                _check_result = problem is None
    return _check_result


def lapack_available() -> bool:
    """True when the CPU kernels call SciPy's BLAS/LAPACK through ctypes; False when they run
    their torch paths instead: ``ADLIB_NO_CTYPES=1``, or the signature check failed (warned
    once). The check runs on the first call."""
    return not ctypes_disabled() and _signatures_ok()


@functools.lru_cache(maxsize=None)
def _nogil_routine(name: str) -> Callable[..., None]:
    """A BLAS/LAPACK routine (``"spotrf"``, ``"dsyrk"``, ...) from SciPy's Cython tables, called
    through ctypes with every argument a pointer (Fortran convention).

    Why: ctypes releases the GIL during the call, so threads run their LAPACK calls at the same
    time; SciPy's Python wrappers (``scipy.linalg.lapack``) hold it (measured: two threads of
    ``potrf`` gave 1.0x through them, 1.9x through this).

    Only after the signature check (:func:`_signatures_ok`): a routine whose arguments differ from
    the ones passed here would corrupt memory silently.
    """
    if not _signatures_ok():
        raise RuntimeError(f"{name} not bound: SciPy's BLAS/LAPACK tables failed adlib's signature check")
    n_args = len(_SIGNATURES[name[1:]].split(","))
    capsule = _table(name[1:]).__pyx_capi__[name]
    # own prototypes: setting argtypes on ctypes.pythonapi's functions would change them for everyone
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_args)(get_pointer(capsule, get_name(capsule)))


class LowerTriangles:
    """BLAS/LAPACK on the lower triangles (C order) of C-contiguous ``(C, C)`` float32/float64
    matrices, given by address (``array.ctypes.data``), each call without the GIL.

    A C-order matrix is its own transpose read in Fortran order, so C order's lower triangle is
    Fortran's upper one (``"U"``) and Fortran's upper Cholesky factor U (U^T U = A) is, read in
    C order, the lower factor L (L L^T = A). The constant arguments are built once: with a few
    thousand small matrices, building them per call costs as much as the arithmetic.
    """

    def __init__(self, channels: int, dtype: np.dtype):
        if not lapack_available():
            raise RuntimeError("BLAS/LAPACK through ctypes is off here (see adlib.kernels.lapack_available); "
                               "use the torch paths")
        kind = np.dtype(dtype)
        if kind not in (np.float32, np.float64):
            raise TypeError(f"float32 or float64 needed, got {kind}")
        prefix = "s" if kind == np.float32 else "d"
        self._real = ctypes.c_float if kind == np.float32 else ctypes.c_double
        self._c = channels
        self._n = self._int(channels)
        self._upper, self._lower, self._no_transpose = (ctypes.c_char_p(flag) for flag in (b"U", b"L", b"N"))
        self._syrk, self._potrf, self._trsm, self._lacpy, self._laset = (
            _nogil_routine(prefix + name) for name in ("syrk", "potrf", "trsm", "lacpy", "laset"))
        self._right, self._one = ctypes.c_char_p(b"R"), ctypes.byref(self._real(1.0))
        self._one_less = self._int(max(channels - 1, 1))
        self._zero = ctypes.byref(self._real(0.0))
        self._next = kind.itemsize   # one element on: the strict upper triangle's first column

    @staticmethod
    def _int(value: int) -> ctypes._CArgObject:
        return ctypes.byref(ctypes.c_int(value))

    def rank_one(self, alpha: float, beta: float) -> Callable[[int, int], None]:
        """``update(matrix, v)``: ``matrix = alpha v v^T + beta matrix`` for a vector ``v (C,)``
        (a symmetric rank-1 update, syrk with one column)."""
        fixed = (self._upper, self._no_transpose, self._n, self._int(1), ctypes.byref(self._real(alpha)))
        middle = (self._n, ctypes.byref(self._real(beta)))

        def update(matrix: int, v: int) -> None:
            self._syrk(*fixed, v, *middle, matrix, self._n)
        return update

    def solve(self, columns: int) -> Callable[[int, int], None]:
        """``solve(factor, rhs)``: ``rhs (C, columns)``, C-contiguous, becomes ``L^{-1} rhs`` for the
        lower factor L (a triangular solve, trsm)."""
        # Fortran sees rhs^T (columns, C) and L^T: solve X L^T = rhs^T from the right
        columns_arg = self._int(columns)
        fixed = (self._right, self._upper, self._no_transpose, self._no_transpose, columns_arg, self._n, self._one)

        def solve(factor: int, rhs: int) -> None:
            self._trsm(*fixed, factor, self._n, rhs, columns_arg)
        return solve

    def cholesky(self, matrix: int) -> int:
        """Lower triangle -> Cholesky factor, in place; the strict upper triangle is not touched.
        Returns LAPACK's info: 0, or the order of the first minor not positive definite."""
        info = ctypes.c_int(0)
        self._potrf(self._upper, self._n, matrix, self._n, ctypes.byref(info))
        return info.value

    def copy(self, dst: int, src: int) -> None:
        """``dst``'s lower triangle, with the diagonal, = ``src``'s."""
        self._lacpy(self._upper, self._n, self._n, src, self._n, dst, self._n)

    def zero_strict_upper(self, matrix: int) -> None:
        """Zeros above the diagonal, the diagonal kept."""
        if self._c < 2:
            return
        # C order's strict upper triangle is Fortran's strict lower one: the lower triangle, with
        # its diagonal, of the (C-1, C-1) block one element on
        self._laset(self._lower, self._one_less, self._one_less, self._zero, self._zero, matrix + self._next, self._n)
