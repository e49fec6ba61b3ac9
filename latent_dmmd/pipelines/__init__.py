from .pipeline_dmmd import DMMDPipeline, write_loader_shim

__all__ = ["DMMDPipeline", "write_loader_shim"]
