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

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(OrderedDict(list(self._modules.items())[index]))
        items = list(self._modules.values())
        try:
            return items[index]
        except (IndexError, TypeError):
            raise IndexError(f"Sequential index {index!r} out of range for {len(items)} modules") from None

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
