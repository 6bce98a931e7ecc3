"""A CUDA-on-the-CPU shim that runs the real csrc/cuda kernels in tests (see emu.h and build.py)."""
