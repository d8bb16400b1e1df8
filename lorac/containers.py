"""Sequential: children named "0", "1", ... (torch's keys, e.g. "0.lora_A")."""

from collections import OrderedDict

from .module import Module


class Sequential(Module):
    """Chains forward through its children and backward through them in reverse."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self.add_module(str(name), _checked_module(module, name))
        else:
            for index, module in enumerate(modules):
                self.add_module(str(index), _checked_module(module, index))

    def append(self, module):
        self.add_module(str(len(self)), _checked_module(module, len(self)))
        return self

    def extend(self, modules):
        """Append each of modules (checked first: a bad item appends none)."""
        modules = [_checked_module(module, len(self) + i) for i, module in enumerate(modules)]
        for module in modules:
            self.add_module(str(len(self)), module)
        return self

    def insert(self, index, module):
        """Put module before position index, as list.insert (torch's range: -len <= index <= len);
        the children are renumbered 0, 1, ..."""
        index = _as_int(index, "insert index")
        if not -len(self) <= index <= len(self):
            raise IndexError(f"Sequential insert index {index} out of range for {len(self)} modules")
        items = list(self._modules.values())
        items.insert(index, _checked_module(module, index))
        self._renumber(items)
        return self

    def pop(self, index):
        module = self[index]
        del self[index]
        return module

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(OrderedDict(list(self._modules.items())[index]))
        return self._modules[self._key_at(index)]

    def __setitem__(self, index, module):
        """Replace the child at position index; its name stays."""
        self.add_module(self._key_at(index), _checked_module(module, index))

    def __delitem__(self, index):
        """Remove the child(ren) at index or slice; the rest are renumbered 0, 1, ... as in torch."""
        keys = list(self._modules)
        doomed = set(keys[index]) if isinstance(index, slice) else {self._key_at(index)}
        self._renumber([module for key, module in self._modules.items() if key not in doomed])

    def _key_at(self, index):
        index = _as_int(index, "index")
        if not -len(self) <= index < len(self):
            raise IndexError(f"Sequential index {index} out of range for {len(self)} modules")
        return list(self._modules)[index]

    def _renumber(self, modules):
        self._modules.clear()
        for position, module in enumerate(modules):
            self._modules[str(position)] = module

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, grad_output):
        for module in reversed(list(self._modules.values())):
            grad_output = module.backward(grad_output)
        return grad_output


def _checked_module(module, name):
    if not isinstance(module, Module):
        raise TypeError(f"Sequential: item {name!r} must be a lorac.Module, got {type(module).__name__}")
    return module


def _as_int(index, what):
    if isinstance(index, bool) or not hasattr(index, "__index__"):
        raise TypeError(f"Sequential {what} must be an int or a slice, got {type(index).__name__} {index!r}")
    return index.__index__()
