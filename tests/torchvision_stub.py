"""A stand-in `torchvision` so timm imports beside a torch build no PyPI torchvision matches.

timm imports torchvision names at module load (datasets, transforms, FrozenBatchNorm2d) but the
Perception Encoder path (Eva blocks, attention pooling, rope) never calls them. Every
`torchvision.*` module is served by a finder, and every attribute is a placeholder class.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _PlaceholderType(type):
    def __getattr__(cls, name: str):  # InterpolationMode.NEAREST and the like: another placeholder
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (cls,), {})


class _Placeholder(metaclass=_PlaceholderType):
    """Any torchvision name timm touches at import; using one means the stub is not enough."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stub: this code path needs the real torchvision")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {})
        setattr(self, name, placeholder)
        return placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Serve torchvision from the stub unless a working one imports."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StubFinder())
