"""Triton kernels, installed as ``fastcore.kernels`` (one module per op family).

Importing a module here imports ``triton``; fastcore.ops does so lazily, only when the
``triton`` backend runs. Kernels know nothing of fastcore's Python modules.
"""
