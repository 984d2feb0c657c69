"""See the speed without a GPU: the Triton kernels compiled for a GPU target exactly as the
launcher specializes them (`compile`), the CUDA C++ kernels compiled with nvcc as the extension
builds them (`cuda`), their main loops counted from the SASS (`sass`), their work per launch
(`kernels`), a MODEL that turns counts into estimated times (`model`), and the CI gate on the
counts (`budgets`). `python -m fusedlora inspect` runs it all (`cli`). Needs Triton, cuobjdump
(the CUDA toolkit's, or the copy Triton ships) and, for the CUDA C++ kernels, nvcc and a CUDA
build of torch (its headers); TRITON_INTERPRET must be unset.
"""
