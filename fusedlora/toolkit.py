"""The CUDA toolkit that builds the extension, for setup.py and for the just-in-time build
(`fusedlora.extension`). Standard library only: setup.py runs this file without importing the
package."""

import os
import shutil

# nvcc's flags for csrc/ (torch's build adds its own: C++ standard, half/bfloat16 macros):
# setup.py, the just-in-time build and the inspection of the compiled kernels use these.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def point_cuda_home() -> None:
    """Set CUDA_HOME, unless it is set, to the toolkit with the runtime headers: the one `nvcc` on
    PATH lives in, else /usr/local/cuda (an `nvcc` wrapper script in /usr/local/bin would otherwise
    make torch look in /usr/local and miss them)."""
    if "CUDA_HOME" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    home = next((c for c in candidates if os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))), None)
    if home:
        os.environ["CUDA_HOME"] = home
