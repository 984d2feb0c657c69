"""Triton kernels of fusedlora, installed as `fusedlora.kernels` (DESIGN §3).

`forward.py` (shrink, fused GEMM, small-M GEMV) and `backward.py` (du/dB, dx, dA) hold the
kernels, `dequant.py`, `dropout.py` and `tiling.py` their shared device code, `configs.py` the tile choices,
`launch.py` the launchers the backend registry calls, and `aot.py` compiles them for a GPU target
without a GPU to read registers and spills. Importing this package imports Triton.
"""
