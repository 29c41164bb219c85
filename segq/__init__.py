"""segq: queue 3D volume segmentation across GPU workers.

The core package imports no torch at module level, so producers (``segq submit``) run on
machines without a GPU stack.
"""

__version__ = "0.1.0"
