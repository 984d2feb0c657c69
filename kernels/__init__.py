"""Triton kernels of fusedlora, installed as `fusedlora.kernels` (see DESIGN §3)."""
