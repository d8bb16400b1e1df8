"""Module.to's arguments, read as torch reads them: a device, a dtype or both.

lorac computes on the CPU only, so the one device it accepts is the CPU
('cpu', 'cpu:0', torch.device('cpu')); code written for torch, such as
``model.to(device)`` with device = 'cpu', runs unchanged, and any other
device (``'cuda'``) raises a ValueError saying so instead of being ignored.
"""

import re

from ._arrays import float_dtype

# torch's device types (the part of a device string before ':')
_DEVICE_TYPES = frozenset((
    "cpu", "cuda", "mps", "xpu", "xla", "meta", "hip", "hpu", "ipu", "mtia", "maia", "ve", "fpga",
    "lazy", "vulkan", "opengl", "opencl", "ideep", "mkldnn", "privateuseone"))
_DEVICE_STRING = re.compile(r"([a-z_]+)(?::(\d+))?")


def _device_type(value):
    """The device type that `value` names ('cpu', 'cuda', ...), or None if it is no device."""
    if isinstance(value, str):
        match = _DEVICE_STRING.fullmatch(value)
        return match.group(1) if match and match.group(1) in _DEVICE_TYPES else None
    kind = getattr(value, "type", None)  # torch.device and the like
    if isinstance(kind, str) and hasattr(value, "index"):
        return kind
    return None


def _check_cpu(device):
    kind = _device_type(device)
    if kind != "cpu":
        raise ValueError(f"to(device): lorac computes on the CPU only, so device must be 'cpu', got {device!r}")


def parse_to_arguments(args, kwargs):
    """Module.to's (*args, **kwargs) -> the dtype to cast to, or None for none.

    Accepted as torch's Module.to: to(dtype), to(device), to(device, dtype),
    and the keywords device=, dtype= and non_blocking= (a bool, with no
    effect here).  The device must be the CPU; a dtype float32 or float64.
    Raises TypeError for an argument of the wrong kind and ValueError for a
    device other than the CPU."""
    unknown = set(kwargs) - {"device", "dtype", "non_blocking"}
    if unknown:
        raise TypeError(f"to() got unexpected keyword arguments {sorted(unknown)}; "
                        "expected device=, dtype= or non_blocking=")
    non_blocking = kwargs.get("non_blocking", False)
    if not isinstance(non_blocking, bool):
        raise TypeError(f"to(non_blocking): expected a bool, got {non_blocking!r}")
    if len(args) > 2:
        raise TypeError(f"to() takes at most 2 positional arguments (device, dtype), got {len(args)}")
    device, dtype, has_dtype = kwargs.get("device"), kwargs.get("dtype"), "dtype" in kwargs
    if args:
        first, rest = args[0], args[1:]
        if _device_type(first) is not None:
            if "device" in kwargs:
                raise TypeError("to() got the device both as an argument and as device=")
            device = first
        elif rest:
            raise TypeError(f"to(device, dtype): the first argument must be a device ('cpu'), got {first!r}")
        else:
            rest = (first,)
        if rest:
            if has_dtype:
                raise TypeError("to() got the dtype both as an argument and as dtype=")
            dtype, has_dtype = rest[0], True
    if device is None and not has_dtype:
        raise TypeError("to() needs a device ('cpu') or a dtype (float32 or float64), got neither")
    if device is not None:
        _check_cpu(device)
    if not has_dtype or (dtype is None and device is not None):
        return None  # a device alone (torch also takes dtype=None with a device as "keep the dtype")
    if dtype is None:
        raise TypeError("to(dtype): dtype must be float32 or float64, got None")
    return float_dtype(dtype, "to(dtype): dtype")
