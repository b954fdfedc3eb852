"""The exceptions attnforge raises: one per kind of Rust error, each an ``attnforge.Error``.

Where a built-in exception means the same (a bad value, a bad type), the class derives from it
too, so ``except ValueError`` still catches a malformed spec or page table.
"""


class Error(Exception):
    """Every attnforge error."""


class SpecError(Error, ValueError):
    """A malformed variant spec. ``file``, ``line``, ``hook`` and ``column`` locate it (each may
    be None); ``detail`` is the message without the location."""

    file = None
    line = None
    hook = None
    column = None
    detail = None


class ParamError(Error, ValueError):
    """A parameter value that does not fit its declaration, or an unknown parameter."""


class BatchError(Error, ValueError):
    """A malformed page table, ``indptr`` or shape."""


class ArgumentError(Error, ValueError):
    """Any other bad argument (an index array of the wrong kind, an unknown layout, ...)."""


class TensorError(Error, ValueError):
    """A tensor of the wrong dtype, shape, device or strides; the message names the argument."""


class UnknownVariantError(Error, LookupError):
    """Neither a spec file nor a shipped variant has this name."""


class CompileError(Error):
    """NVRTC rejected a kernel (the message shows the rendered lines and the spec hook)."""


class NvrtcMissingError(Error, RuntimeError):
    """NVRTC or the CUDA headers it needs were not found."""


class NoGpuError(Error, RuntimeError):
    """No CUDA driver or no usable GPU."""


class CudaError(Error, RuntimeError):
    """A CUDA driver call failed."""


class PlanError(Error, RuntimeError):
    """A plan cannot be made or used (run before plan, graph capacities exceeded, a capture of a
    wrapper not made for CUDA graphs, ...)."""


class UnsupportedError(Error):
    """Valid, but this build or GPU cannot run it (a head dim, a dtype, shared memory)."""


class CacheError(Error):
    """The kernel cache could not be used."""


class FileError(Error, OSError):
    """A file could not be read or written."""


class InternalError(Error):
    """A bug in attnforge (a Rust panic, caught at the boundary). Please report it."""
