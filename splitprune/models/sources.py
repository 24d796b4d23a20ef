"""Where a model comes from: a built-in backbone, any torchvision or timm classifier, or the user's own factory.

`--model` names a source: `vgg11_bn` (built in), `torchvision:NAME`, `timm:NAME` or `py:package.module:factory`.
`builder(source, num_classes, in_channels)` returns a function that builds the whole model, without weights and
without downloading anything; the caller decides where (fake tensors, the CPU) and which part gets memory.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from splitprune.config import MODEL_NAMES, from_source_text
from splitprune.errors import UserError

BUILTIN = MODEL_NAMES
_PY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Source:
    kind: str   # "builtin", "torchvision", "timm" or "py"
    name: str   # the built-in name, the torchvision/timm model name, or "package.module:factory"

    def __str__(self) -> str:
        return self.name if self.kind == "builtin" else f"{self.kind}:{self.name}"


def parse_source(text: str) -> Source:
    """The source `text` names; UserError (with close names) when it names none."""
    from_source_text(text)
    if text in BUILTIN:
        return Source("builtin", text)
    kind, _, name = text.partition(":")
    if kind == "py" and not _PY_RE.match(name):
        raise UserError(f"--model py:{name}: write py:package.module:factory (a function returning an nn.Module)")
    return Source(kind, name)


def import_torchvision():
    """torchvision, importable next to the CPU torch wheel: PyPI's torchvision 0.28.0 wheel is built for CUDA, its
    compiled operators (nms, roi_align, ...) do not load against the CPU torch, and its import then stops at
    registering fakes for them. The classification models need none of those operators: their schemas are
    declared (without kernels) so that the import goes through; calling one of them still fails loudly."""
    try:
        import torchvision
        return torchvision
    except ImportError:
        raise UserError("torchvision is not installed: pip install torchvision==0.28.0 (the release that matches "
                        "torch 2.13.0)") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_torchvision_ops()
    import torchvision
    return torchvision


_LIBRARIES: list = []  # keep the fragment alive for the process


def _declare_torchvision_ops() -> None:
    import torch

    if _LIBRARIES:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        lib.define(schema)
    _LIBRARIES.append(lib)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    models = import_torchvision().models
    names = models.list_models(module=models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"torchvision has no classification model {name!r}{hint} (torchvision.models.list_models())")
    return models.get_model_builder(name)


def _timm_module():
    import_torchvision()  # timm imports torchvision when it is installed
    try:
        import timm
    except ImportError:
        raise UserError("timm is not installed: pip install '.[timm]' (or pip install timm)") from None
    return timm


def _py_factory(name: str) -> Callable[..., nn.Module]:
    module_name, factory_name = name.rsplit(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--model py:{name}: cannot import {module_name}: {exc}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UserError(f"--model py:{name}: {module_name} has no function {factory_name}")
    return factory


def _accepts(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def accepts_classes(source: Source) -> bool:
    """Whether a `py:` factory takes num_classes (the others always do)."""
    return source.kind != "py" or _accepts(_py_factory(source.name), "num_classes")


def builder(source: Source, num_classes: int, in_channels: int) -> Callable[[], nn.Module]:
    """A function that builds the whole model of `source` with `num_classes` outputs, no weights, nothing
    downloaded. A factory that cannot take the class count builds its own; the caller replaces its head."""
    if source.kind == "builtin":
        from splitprune.models import resnet, vgg

        make = {"vgg11_bn": vgg.vgg11_bn, "vgg11_bn_compact": vgg.vgg11_bn_compact, "resnet18": resnet.resnet18}[
            source.name]
        return lambda: make(num_classes=num_classes, in_channels=in_channels)
    if source.kind == "torchvision":
        make = _torchvision_builder(source.name)
        return lambda: make(weights=None, num_classes=num_classes)
    if source.kind == "timm":
        timm = _timm_module()
        if source.name not in timm.list_models():
            close = difflib.get_close_matches(source.name, timm.list_models(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"timm has no model {source.name!r}{hint}")
        return lambda: timm.create_model(source.name, pretrained=False, num_classes=num_classes)
    factory = _py_factory(source.name)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if _accepts(factory, k)}

    def build() -> nn.Module:
        try:
            model = factory(**kwargs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: say what it raised, in one line
            raise UserError(f"--model py:{source.name} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--model py:{source.name} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    return build
