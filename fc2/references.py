"""Every reference to a replaced module, found and pointed at its replacement.

Replacing ``attention.o_proj`` on its parent module is not enough inside an engine: other objects
keep their own reference to the same linear and call it. vLLM's ``MultiHeadLatentAttentionWrapper``
(DeepSeek-V2/V3) registers ``o_proj`` as its own submodule; vllm-ascend's MLA / SFA attention impls
(plain objects held by the attention layer) keep ``self.o_proj`` and call ``o_proj(x,
is_prefill=...)``; vllm-ascend's FlashComm1 registers row-parallel linears in the compilation
config's ``static_forward_context``. Left alone, the old linear keeps running (FlashComm2 silently
off) with its W_o allocated beside the new one.

`retarget` walks modules and the plain objects they hold (attributes, dataclass fields, lists,
tuples, dicts, sets, bound methods), bounded in depth and cycle-safe, and replaces every reference
to an old module by its new one. `find_references` walks the same way and reports where an old
module is still reachable: the caller checks that it finds nothing. Tensors, types, functions,
Python modules, strings and numbers are never entered, nor nn.Module's own bookkeeping (parameters,
buffers, hooks).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

#: How many plain-object levels below the nearest module the walk goes (modules are always entered).
MAX_OBJECT_DEPTH = 6

_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype, torch.device, type,
          types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, property,
          types.MethodType)
#: nn.Module's own attributes (parameters, buffers, hooks, flags); `_modules` is walked separately.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))

#: A reference's holder: replaces the reference with a new object (None: the holder is immutable).
Setter = Optional[Callable[[Any], None]]


def _enterable(value: Any) -> bool:
    if isinstance(value, _ATOMS):
        return False
    return isinstance(value, (nn.Module, list, tuple, dict, set, frozenset)) or hasattr(value, "__dict__") \
        or dataclasses.is_dataclass(value)


def _references(value: Any) -> Iterator[tuple[str, Any, Setter]]:
    """(label, referenced object, setter) for each reference ``value`` holds."""
    if isinstance(value, nn.Module):
        for name, child in list(value._modules.items()):
            yield name, child, lambda new, n=name: value._modules.__setitem__(n, new)
        for name, child in list(vars(value).items()):
            if name not in _MODULE_INTERNALS:
                yield name, child, lambda new, n=name: object.__setattr__(value, n, new)
    elif isinstance(value, list):
        for i, child in enumerate(list(value)):
            yield f"[{i}]", child, lambda new, i=i: value.__setitem__(i, new)
    elif isinstance(value, dict):
        for key, child in list(value.items()):
            yield f"[{key!r}]", child, lambda new, k=key: value.__setitem__(k, new)
    elif isinstance(value, (tuple, set, frozenset)):
        for i, child in enumerate(list(value)):
            yield f"[{i}]", child, None  # immutable or unordered: the holder's holder rebuilds it
    elif isinstance(getattr(value, "__dict__", None), dict):
        for name, child in list(vars(value).items()):
            yield f".{name}", child, lambda new, n=name: object.__setattr__(value, n, new)
    elif dataclasses.is_dataclass(value):  # slotted dataclass
        for field in dataclasses.fields(value):
            yield f".{field.name}", getattr(value, field.name), \
                lambda new, n=field.name: object.__setattr__(value, n, new)


def _rebuild(container: Any, items: list) -> Any:
    if hasattr(container, "_fields"):  # namedtuple
        return type(container)(*items)
    return type(container)(items)


def _walk(roots: Iterable[tuple[str, Any]], on_reference: Callable[[str, Any], Any]) -> list[str]:
    """Visit every reference reachable from ``roots`` once per holder: ``on_reference(path, obj)``
    returns a replacement for ``obj`` or None. A replacement is written into the holder (a tuple or
    set holding one is rebuilt and written into its own holder). Returns the paths whose holder
    could not take a replacement."""
    unwritable: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(label, root, 0) for label, root in roots]
    while stack:
        path, value, depth = stack.pop()
        try:
            if id(value) in seen or not _enterable(value):
                continue
        except ReferenceError:  # a dead weakref proxy
            continue
        seen.add(id(value))
        for label, child, setter in _references(value):
            child_path = f"{path}.{label}" if label[0] not in ".[" else f"{path}{label}"
            new = on_reference(child_path, child)
            if new is None and isinstance(child, (tuple, set, frozenset)):
                items = list(child)
                news = [on_reference(f"{child_path}[{i}]", item) for i, item in enumerate(items)]
                if any(n is not None for n in news):
                    new = _rebuild(child, [n if n is not None else item for n, item in zip(news, items)])
            if new is not None:
                if setter is None:
                    unwritable.append(child_path)
                else:
                    setter(new)
                    child = new
            next_depth = 0 if isinstance(child, nn.Module) else depth + 1
            if next_depth <= MAX_OBJECT_DEPTH:
                stack.append((child_path, child, next_depth))
    return unwritable


def _lookup(obj: Any, mapping: dict[int, tuple[nn.Module, nn.Module]]) -> Optional[tuple[nn.Module, nn.Module]]:
    pair = mapping.get(id(obj))
    return pair if pair is not None and pair[0] is obj else None


def retarget(roots: Iterable[tuple[str, Any]], replacements: dict[nn.Module, nn.Module]) -> list[str]:
    """Point every reference to a key of ``replacements`` (an old module) at its value, bound
    methods of an old module at the new module's method of the same name; the paths rewritten.
    ``roots``: (label, object) pairs to start from (the model, engine registries)."""
    mapping = {id(old): (old, new) for old, new in replacements.items()}
    rewritten: list[str] = []

    def on_reference(path: str, obj: Any) -> Any:
        pair = _lookup(obj, mapping)
        if pair is not None:
            rewritten.append(path)
            return pair[1]
        if isinstance(obj, types.MethodType):
            pair = _lookup(obj.__self__, mapping)
            if pair is not None and hasattr(pair[1], obj.__func__.__name__):
                rewritten.append(path)
                return getattr(pair[1], obj.__func__.__name__)
        return None

    _walk(roots, on_reference)
    return rewritten


def find_references(roots: Iterable[tuple[str, Any]], modules: Iterable[nn.Module]) -> dict[str, str]:
    """Where any of ``modules`` is still reachable from ``roots`` (directly or as a bound method's
    ``self``): {path: the module's class name}."""
    wanted = {id(m): m for m in modules}
    found: dict[str, str] = {}

    def on_reference(path: str, obj: Any) -> None:
        target = obj.__self__ if isinstance(obj, types.MethodType) else obj
        if id(target) in wanted and wanted[id(target)] is target:
            found[path] = type(target).__name__
        return None

    _walk(roots, on_reference)
    return found
