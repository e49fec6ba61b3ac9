from .folders import write_loader_shim
from .pipeline_dmmd import DMMDPipeline

__all__ = ["DMMDPipeline", "write_loader_shim"]
