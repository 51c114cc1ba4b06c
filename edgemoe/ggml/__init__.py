"""ctypes binding to the ggml C API that ships inside the pinned llama-cpp-python.

Only the functions the engine uses are declared (lib.py); tensors can view memory-mapped GGUF
bytes without copying (context.py); graphs run on a persistent CPU thread pool (compute.py).
"""

from edgemoe.ggml.lib import GGMLType, lib
from edgemoe.ggml.context import Context, TensorPtr
from edgemoe.ggml.compute import Compute

__all__ = ["GGMLType", "lib", "Context", "TensorPtr", "Compute"]
