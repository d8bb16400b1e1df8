"""Optimizer: param groups, per-parameter state, zero_grad and state dicts (torch's layout)."""

import copy
import numbers

import numpy as np

from .._arrays import FLOAT_DTYPES
from ..module import Parameter


class Optimizer:
    """Base class with torch.optim.Optimizer's bookkeeping.

    ``params`` is an iterable of lorac.Parameter (e.g. ``model.parameters()``),
    of (name, Parameter) pairs (``model.named_parameters()``: each group then
    keeps a ``"param_names"`` list, saved in its state dict, as torch does) or
    of dicts ``{"params": [...], "lr": ..., ...}`` (parameter groups with
    their own hyper-parameters; all named or none).  ``state`` maps a
    Parameter to its state dict.
    Subclasses define ``_check_group(group)`` (validates hyper-parameters,
    raising ValueError/TypeError) and ``_update(param, group, state)`` (one
    fused kernel call).
    """

    _required_state = ()  # fields a non-empty saved state of one parameter must have

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}
        self.param_groups = []
        if isinstance(params, Parameter):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of lorac.Parameter "
                            "(e.g. model.parameters()) or of dicts, got a single Parameter")
        self._reject_set(params, "params")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError(f"{type(self).__name__}: params must be an iterable of lorac.Parameter or "
                            f"of dicts, got {type(params).__name__}") from None
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # -- groups -------------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a dict {"params": iterable of Parameter, hyper-parameter: value, ...}."""
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a parameter group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"{name}: a parameter group needs a 'params' entry")
        params = param_group["params"]
        self._reject_set(params, "a parameter group's params")
        params = [params] if isinstance(params, Parameter) else list(params)
        params, names = self._split_names(params)
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: params[{i}] must be a lorac.Parameter, got {type(p).__name__}")
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}: params[{i}] must have dtype float32 or float64, got {p.dtype}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{name}: a parameter appears twice in one parameter group")
        if self.param_groups and ("param_names" in self.param_groups[0]) != (names is not None):
            raise ValueError(f"{name}: all parameter groups must be named (from named_parameters()) or none; "
                             f"cannot add a group {'with' if names is not None else 'without'} names")
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in existing for p in params):
            raise ValueError(f"{name}: some parameters appear in more than one parameter group")
        unknown = set(param_group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"{name}: unknown hyper-parameter(s) {sorted(unknown)} in a parameter group "
                            f"(expected some of {sorted(self.defaults)})")
        group = dict(self.defaults)
        group.update((k, v) for k, v in param_group.items() if k != "params")
        group = self._check_group(group)
        group["params"] = params
        if names is not None:
            group["param_names"] = names
        self.param_groups.append(group)

    def _reject_set(self, params, what):
        if isinstance(params, (set, frozenset)):
            raise TypeError(f"{type(self).__name__}: {what} must be an ordered iterable (a list, or "
                            "model.parameters()), got a set, whose order changes between runs")

    def _split_names(self, items):
        """(parameters, names or None) from a list of Parameters or of (name, Parameter) pairs."""
        named = [isinstance(item, tuple) for item in items]
        if not any(named):
            return items, None
        if not all(named):
            raise ValueError(f"{type(self).__name__}: a parameter group mixes (name, Parameter) pairs with "
                             "bare parameters; give all names (named_parameters()) or none")
        for i, item in enumerate(items):
            if len(item) != 2 or not isinstance(item[0], str):
                raise TypeError(f"{type(self).__name__}: params[{i}] must be a (str name, Parameter) pair, got "
                                f"a tuple of {', '.join(type(x).__name__ for x in item)}")
        return [item[1] for item in items], [item[0] for item in items]

    def _check_group(self, group):
        """Validated copy of a group's hyper-parameters (subclasses extend)."""
        return group

    # -- stepping -------------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """Drop (default, like torch) or zero every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad[...] = 0

    def step(self, closure=None):
        """Update every parameter that trains (requires_grad) and has a gradient.

        Parameters without a gradient are skipped, as in torch.  All gradients
        are checked before any parameter changes.  ``closure`` (optional)
        re-evaluates the model and returns the loss, which step returns.
        """
        loss = closure() if closure is not None else None
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    self._check_param(p)
                    work.append((group, p))
        for group, p in work:
            state = self.state.get(p, {})
            self._update(p, group, state)
            if state:  # like torch, plain SGD keeps no per-parameter entry at all
                self.state[p] = state
        return loss

    def _check_param(self, p):
        name = type(self).__name__
        data, grad = p.data, p.grad
        if not isinstance(grad, np.ndarray):
            raise TypeError(f"{name}.step(): a gradient must be a numpy.ndarray, got {type(grad).__name__}")
        if grad.shape != data.shape:
            raise ValueError(f"{name}.step(): gradient of shape {grad.shape} for a parameter of shape "
                             f"{data.shape}")
        if grad.dtype != data.dtype:
            raise TypeError(f"{name}.step(): gradient of dtype {grad.dtype} for a parameter of dtype "
                            f"{data.dtype}")
        if data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.step(): parameters must be float32 or float64, got {data.dtype}")
        if not (data.flags.c_contiguous and data.flags.writeable):
            raise ValueError(f"{name}.step(): a parameter's data must be a writable C-contiguous array "
                             "(it is updated in place)")
        if np.may_share_memory(grad, data):
            raise ValueError(f"{name}.step(): a parameter's gradient shares memory with its data")

    def _update(self, param, group, state):
        raise NotImplementedError

    @staticmethod
    def _flat(array):
        """A 1-D view of a C-contiguous array (what the kernels update in place)."""
        return array.reshape(-1)

    def _new_buffer(self, param):
        return np.zeros_like(param.data)

    # -- state dicts ------------------------------------------------------------
    def state_dict(self):
        """{'state': {index: {name: value}}, 'param_groups': [{hyper..., 'params': [index, ...]}]}.

        torch's layout: parameters are numbered in group order; arrays are
        copies, so the result does not change as training goes on."""
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[index[id(p)]] = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                           for k, v in self.state[p].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore state and hyper-parameters saved by state_dict() (all-or-nothing).

        The groups must have the same sizes as this optimizer's; every array
        is checked against its parameter's shape before anything changes.
        Arrays may be NumPy arrays or anything np.asarray accepts (torch
        tensors from a torch.optim state dict work too)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError(f"{name}.load_state_dict(): expected a dict with 'state' and 'param_groups', "
                            f"got {type(state_dict).__name__}")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict(): {len(saved_groups)} parameter group(s) in the state "
                             f"dict, the optimizer has {len(self.param_groups)}")
        index_to_param = {}
        new_groups = []
        for g, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            ids = list(saved.get("params", []))
            if len(ids) != len(mine["params"]):
                raise ValueError(f"{name}.load_state_dict(): group {g} has {len(ids)} parameter(s) in the "
                                 f"state dict, the optimizer's has {len(mine['params'])}")
            index_to_param.update(zip(ids, mine["params"]))
            hyper = dict(mine)
            # the hyper-parameters, and a scheduler's record of the starting lr (as torch restores it)
            hyper.update((k, copy.deepcopy(v)) for k, v in saved.items() if k in self.defaults or k == "initial_lr")
            hyper = self._check_group(hyper)
            if "initial_lr" in hyper:
                hyper["initial_lr"] = check_real(hyper["initial_lr"], "initial_lr", f"{name}.load_state_dict()",
                                                 minimum=0)
            if "param_names" in saved:  # saved names replace ours (torch's rule); they do not steer loading
                hyper["param_names"] = self._checked_names(saved["param_names"], len(ids), g)
            hyper["params"] = mine["params"]
            new_groups.append(hyper)
        new_state = {}
        for key, entry in dict(state_dict["state"]).items():
            if key not in index_to_param:
                raise ValueError(f"{name}.load_state_dict(): state for unknown parameter index {key!r}")
            param = index_to_param[key]
            new_state[param] = self._checked_state(key, param, entry)
        self.param_groups[:] = new_groups
        self.state = new_state

    def _checked_names(self, names, count, g):
        """A saved group's param_names as a new list of `count` strings."""
        owner = f"{type(self).__name__}.load_state_dict()"
        if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
            raise TypeError(f"{owner}: group {g}'s param_names must be a list of str, got {type(names).__name__}")
        names = list(names)
        if len(names) != count or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{owner}: group {g}'s param_names must be {count} str, got {names!r:.200}")
        return names

    def _checked_state(self, key, param, entry):
        """A validated copy of one parameter's saved state."""
        name = type(self).__name__
        if not isinstance(entry, dict):
            raise TypeError(f"{name}.load_state_dict(): state[{key!r}] must be a dict, got {type(entry).__name__}")
        out = {}
        for field, value in entry.items():
            if field == "step":
                step = float(np.asarray(value))
                if not step.is_integer() or step < 0:
                    raise ValueError(f"{name}.load_state_dict(): state[{key!r}]['step'] must be a "
                                     f"non-negative integer, got {step}")
                out[field] = int(step)
                continue
            if isinstance(value, numbers.Number) or value is None:
                out[field] = value
                continue
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"{name}.load_state_dict(): state[{key!r}][{field!r}] must be a numeric "
                                f"array, got dtype {arr.dtype}")
            if arr.shape != param.shape:
                raise ValueError(f"{name}.load_state_dict(): state[{key!r}][{field!r}] has shape {arr.shape}, "
                                 f"the parameter has shape {param.shape}")
            out[field] = np.array(arr, dtype=param.dtype, order="C", copy=True)
        missing = [f for f in self._required_state if f not in out or out[f] is None]
        if out and missing:
            raise ValueError(f"{name}.load_state_dict(): state[{key!r}] lacks {missing}")
        return out

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        lines.append(")")
        return "\n".join(lines)


def check_real(value, what, owner, minimum=None, maximum=None, max_open=False):
    """value as a finite float in [minimum, maximum] (or [minimum, maximum)); else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{owner}: {what} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{owner}: {what} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {what} must be >= {minimum:g}, got {value:g}")
    if maximum is not None and (value >= maximum if max_open else value > maximum):
        raise ValueError(f"{owner}: {what} must be {'<' if max_open else '<='} {maximum:g}, got {value:g}")
    return value
