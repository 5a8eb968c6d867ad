"""UnCoL-MONAI: the Python code that the bundle's configs wire together."""

import os

# Large CPU tensors on transparent huge pages (PyTorch's own switch, read at its first large
# allocation, so it must be set before training starts; a value the user set wins). Tensors above
# glibc's 32 MB mmap limit are mapped and unmapped on every allocation, and each 4 KB page faults
# in again: on a small CPU machine a 3D stage-2 step spent a large share of its time in the kernel
# (measured in the project's research record, research/results.md). No effect on results; none
# where the kernel has huge pages off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
