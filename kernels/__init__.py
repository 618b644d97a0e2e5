"""Triton kernels of fastrome, installed as ``fastrome.kernels``.

Kernels only: no argument checks and no policy. :mod:`fastrome.ops` decides when they run.
"""
