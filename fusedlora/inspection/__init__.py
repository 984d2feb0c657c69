"""See the speed without a GPU: the Triton kernels compiled for a GPU target exactly as the
launcher specializes them (`compile`), their main loops counted from the SASS (`sass`), their
work per launch (`kernels`), a MODEL that turns counts into estimated times (`model`), and the CI
gate on the counts (`budgets`). `python -m fusedlora inspect` runs it all (`cli`). Needs Triton
and cuobjdump (the CUDA toolkit's, or the copy Triton ships); TRITON_INTERPRET must be unset.
"""
