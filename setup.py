"""Packaging: the pure-Python package, `kernels/` installed as `fusedlora.kernels`, and, when
FUSEDLORA_BUILD_CUDA=1, the CUDA extension `fusedlora._C` built from csrc/ (needs a CUDA build of
torch and nvcc; build with `pip install --no-build-isolation .` so that torch is importable).
TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0"); MAX_JOBS caps the parallel
compiles. The kernels use WMMA (HMMA), which needs no sm_90a objects."""

import glob
import os
import runpy

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FUSEDLORA_BUILD_CUDA") == "1":
    toolkit = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusedlora", "toolkit.py"))
    toolkit["point_cuda_home"]()  # without importing fusedlora, which needs torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules = [
        CUDAExtension(
            "fusedlora._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": toolkit["NVCC_FLAGS"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=["fusedlora", "fusedlora.backends", "fusedlora.formats", "fusedlora.benchmark", "fusedlora.inspection",
              "fusedlora.kernels"],
    package_dir={"fusedlora.kernels": "kernels"},
    package_data={"fusedlora": ["data/*.tsv", "data/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
