"""Containers with torch's names and keys: Sequential and ModuleList name their
children "0", "1", ... (keys such as "0.lora_A"); ModuleDict by its own keys."""

from collections import OrderedDict
from collections.abc import Mapping

from .module import Module


class _ModuleSequence(Module):
    """Children kept as a list named "0", "1", ...: torch's list operations,
    renumbering after an insertion or a deletion as torch does."""

    def _add_all(self, modules):
        for index, module in enumerate(modules):
            self.add_module(str(index), self._checked(module, index))

    def append(self, module):
        self.add_module(str(len(self)), self._checked(module, len(self)))
        return self

    def extend(self, modules):
        """Append each of modules (checked first: a bad item appends none)."""
        modules = [self._checked(module, len(self) + i) for i, module in enumerate(modules)]
        for module in modules:
            self.add_module(str(len(self)), module)
        return self

    def insert(self, index, module):
        """Put module before position index, as list.insert (torch's range: -len <= index <= len);
        the children are renumbered 0, 1, ..."""
        index = self._as_int(index, "insert index")
        if not -len(self) <= index <= len(self):
            raise IndexError(f"{type(self).__name__} insert index {index} out of range for {len(self)} modules")
        items = list(self._modules.values())
        items.insert(index, self._checked(module, index))
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
            return self._slice(index)
        return self._modules[self._key_at(index)]

    def __setitem__(self, index, module):
        """Replace the child at position index; its name stays."""
        self.add_module(self._key_at(index), self._checked(module, index))

    def __delitem__(self, index):
        """Remove the child(ren) at index or slice; the rest are renumbered 0, 1, ... as in torch."""
        keys = list(self._modules)
        doomed = set(keys[index]) if isinstance(index, slice) else {self._key_at(index)}
        self._renumber([module for key, module in self._modules.items() if key not in doomed])

    def _key_at(self, index):
        index = self._as_int(index, "index")
        if not -len(self) <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(self)} modules")
        return list(self._modules)[index]

    def _renumber(self, modules):
        self._modules.clear()
        for position, module in enumerate(modules):
            self._modules[str(position)] = module

    def _checked(self, module, name):
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: item {name!r} must be a lorac.Module, "
                            f"got {type(module).__name__}")
        return module

    def _as_int(self, index, what):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"{type(self).__name__} {what} must be an int or a slice, "
                            f"got {type(index).__name__} {index!r}")
        return index.__index__()


class Sequential(_ModuleSequence):
    """Chains forward through its children and backward through them in reverse.

    Sequential(m0, m1, ...) names them "0", "1", ...; Sequential(OrderedDict)
    keeps the dict's names, as in torch (a slice keeps the names too)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self.add_module(str(name), self._checked(module, name))
        else:
            self._add_all(modules)

    def _slice(self, index):
        return Sequential(OrderedDict(list(self._modules.items())[index]))

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, grad_output):
        for module in reversed(list(self._modules.values())):
            grad_output = module.backward(grad_output)
        return grad_output


class ModuleList(_ModuleSequence):
    """A list of modules that registers them, as torch.nn.ModuleList: no
    forward of its own (the owner calls the items); a slice is a new
    ModuleList numbered from 0; ``+=`` extends it."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _slice(self, index):
        return ModuleList(list(self._modules.values())[index])

    def __iadd__(self, modules):
        return self.extend(modules)

    def __add__(self, other):
        return ModuleList(list(self) + list(other))


class ModuleDict(Module):
    """Modules by name, in insertion order, registered as children under
    their keys, as torch.nn.ModuleDict (state-dict keys "key.param")."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key):
        self._check_has(key)
        return self._modules[key]

    def __setitem__(self, key, module):
        self.update([(key, module)])

    def __delitem__(self, key):
        self._check_has(key)
        del self._modules[key]

    def _check_has(self, key):
        if not isinstance(key, str) or key not in self._modules:
            raise KeyError(f"ModuleDict has no key {key!r}; its keys are {list(self._modules)}")

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def pop(self, key):
        module = self[key]
        del self[key]
        return module

    def clear(self):
        self._modules.clear()

    def update(self, modules):
        """Add or replace from a mapping or an iterable of (key, module) pairs;
        every pair is checked first, so a bad one adds none."""
        pairs = list(modules.items()) if isinstance(modules, Mapping) else list(modules)
        checked = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"ModuleDict.update: item {i} must be a (key, module) pair, "
                                f"got {type(pair).__name__}")
            key, module = pair
            if not isinstance(key, str) or not key or "." in key:
                raise KeyError(f"ModuleDict: a key must be a non-empty str without '.', got {key!r}")
            if self._name_taken(key, self._modules):
                raise KeyError(f"ModuleDict: key {key!r} is already an attribute of ModuleDict")
            if not isinstance(module, Module):
                raise TypeError(f"ModuleDict: item {key!r} must be a lorac.Module, got {type(module).__name__}")
            checked.append((key, module))
        for key, module in checked:
            self.add_module(key, module)
