"""Compile recorded Triton launches for a GPU this machine does not have, as the launch would.

A launch's arguments go through Triton's own binder (the code that turns arguments into a
kernel's specialization at launch: an integer equal to 1 becomes a constant, pointers and
integers divisible by 16 get an alignment hint, None becomes a constant), built for the target
instead of the local driver; the specialization is then compiled for that target. So the code
inspected is the code a launch on that GPU would compile, not a hand-written approximation.
(`create_function_from_signature` and `JITFunction._pack_args` are Triton internals, the same in
Triton 3.6 to 3.8; a Triton that changes them fails `tests/test_inspection.py`.)
"""

import functools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from ..backends.triton_launch import Launch


@functools.lru_cache(maxsize=None)
def _binder(kernel, arch: int):
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialize(launch: Launch, arch: int) -> tuple[ASTSource, dict]:
    """(Triton's source object, compile options) of `launch` on sm_`arch`."""
    backend, binder = _binder(launch.kernel, arch)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                     options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options.__dict__


def bound_arguments(launch: Launch, arch: int) -> dict:
    """The kernel's parameters bound to the launch's values (constexprs included), by name."""
    _, binder = _binder(launch.kernel, arch)
    return dict(binder(*launch.args, **launch.kwargs)[0])


def signature_of(launch: Launch, arch: int) -> dict:
    """The kernel's parameter types as the launch specializes them ("constexpr" for constants)."""
    return dict(specialize(launch, arch)[0].signature)


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (Triton's CompiledKernel: `.asm["cubin"]`, `.metadata`) of `launch`."""
    source, options = specialize(launch, arch)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
