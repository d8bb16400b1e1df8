"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD's rules)."""

from .. import _C
from .optimizer import Optimizer, check_real


class SGD(Optimizer):
    """torch.optim.SGD: one fused C pass per parameter (csrc/optim*).

    d = grad + weight_decay * param; with momentum, buf = d on the first step
    and momentum * buf + (1 - dampening) * d afterwards, d = d + momentum * buf
    (nesterov) or buf; param -= lr * d.  State: 'momentum_buffer' (only when
    momentum != 0, only for parameters that train).
    """

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    def _check_group(self, group):
        owner = type(self).__name__
        group["lr"] = check_real(group["lr"], "lr", owner, minimum=0)
        group["momentum"] = check_real(group["momentum"], "momentum", owner, minimum=0)
        group["dampening"] = check_real(group["dampening"], "dampening", owner)
        group["weight_decay"] = check_real(group["weight_decay"], "weight_decay", owner, minimum=0)
        group["nesterov"] = bool(group["nesterov"])
        group["maximize"] = bool(group["maximize"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov momentum requires momentum > 0 and dampening = 0, got "
                             f"momentum={group['momentum']:g}, dampening={group['dampening']:g}")
        return group

    def _update(self, param, group, state):
        momentum = group["momentum"]
        buf = None
        init = False
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = self._new_buffer(param)
                init = True
        _C.sgd_step(self._flat(param.data), self._flat(param.grad),
                    None if buf is None else self._flat(buf), group["lr"], momentum,
                    group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"], init)
