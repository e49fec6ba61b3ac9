"""latent_dmmd: the diffusion MMD gradient flow (DMMD) as diffusers components.

    from latent_dmmd import DMMDPipeline
    images = DMMDPipeline.from_pretrained("path/or/hub-id")(num_images=8).images

The components load on first use (PEP 562), so ``latent-dmmd --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["DMMDDiscriminator", "DMMDGenerator", "DMMDPipeline", "DMMDScheduler", "__version__"]

_COMPONENTS = {"DMMDDiscriminator": ".models", "DMMDGenerator": ".models", "DMMDPipeline": ".pipelines",
               "DMMDScheduler": ".schedulers"}  # fmt: skip


def __getattr__(name: str):
    if name in _COMPONENTS:
        value = getattr(importlib.import_module(_COMPONENTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained(folder)`` find ``DMMDPipeline`` once this package is
    imported: diffusers looks a folder's ``_class_name`` up on its own module. The lookup is answered
    lazily (the module's class gains our names), so nothing of ours is imported while diffusers itself,
    or one of our modules that imports it, is still loading."""
    import diffusers

    module_type = type(diffusers)
    if getattr(module_type, "_resolves_latent_dmmd", False):
        return

    class _WithDMMD(module_type):
        _resolves_latent_dmmd = True

        def __getattr__(self, name):
            if name in _COMPONENTS:
                value = __getattr__(name)
                setattr(self, name, value)
                return value
            fallback = getattr(super(), "__getattr__", None)
            if fallback is None:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            return fallback(name)

    diffusers.__class__ = _WithDMMD


class _RegisterAfterDiffusers(importlib.abc.MetaPathFinder):
    """Registers the components the moment diffusers is imported (after this package was), so the
    promise above holds without importing torch and diffusers for every ``import latent_dmmd``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_with_diffusers()

        spec.loader.exec_module = exec_module
        return spec


if "diffusers" in sys.modules:
    _register_with_diffusers()
elif not any(isinstance(f, _RegisterAfterDiffusers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterDiffusers())
