"""Packaging: the pure-Python package; `kernels/` is installed as `fusedlora.kernels`."""

from setuptools import setup

setup(
    packages=["fusedlora", "fusedlora.formats", "fusedlora.kernels"],
    package_dir={"fusedlora.kernels": "kernels"},
)
