"""C kernels for CPU tensors, built on first use by the system compiler (``build.py``)."""
