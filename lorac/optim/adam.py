"""Adam and AdamW (torch.optim's rules, bias correction included)."""

from .. import _C
from .optimizer import Optimizer, check_real


class Adam(Optimizer):
    """torch.optim.Adam: one fused C pass per parameter (csrc/optim*).

    g = grad + weight_decay * param (L2, coupled); m = lerp(m, g, 1 - beta1);
    v = beta2 v + (1 - beta2) g^2; param -= lr / (1 - beta1^t) * m /
    (sqrt(v) / sqrt(1 - beta2^t) + eps).  State per parameter that trains:
    'step', 'exp_avg', 'exp_avg_sq' (and 'max_exp_avg_sq' with amsgrad).
    """

    _decoupled = False
    _required_state = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 maximize=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    def _check_group(self, group):
        owner = type(self).__name__
        group["lr"] = check_real(group["lr"], "lr", owner, minimum=0)
        betas = group["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}") from None
        group["betas"] = (check_real(beta1, "betas[0]", owner, 0, 1, max_open=True),
                          check_real(beta2, "betas[1]", owner, 0, 1, max_open=True))
        group["eps"] = check_real(group["eps"], "eps", owner, minimum=0)
        group["weight_decay"] = check_real(group["weight_decay"], "weight_decay", owner, minimum=0)
        group["amsgrad"] = bool(group["amsgrad"])
        group["maximize"] = bool(group["maximize"])
        return group

    def _update(self, param, group, state):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = self._new_buffer(param)
            state["exp_avg_sq"] = self._new_buffer(param)
        amsgrad = group["amsgrad"]
        if amsgrad and state.get("max_exp_avg_sq") is None:
            state["max_exp_avg_sq"] = self._new_buffer(param)
        step = state["step"] + 1
        beta1, beta2 = group["betas"]
        flat = self._flat
        _C.adam_step(flat(param.data), flat(param.grad), flat(state["exp_avg"]), flat(state["exp_avg_sq"]),
                     flat(state["max_exp_avg_sq"]) if amsgrad else None, step, group["lr"], beta1, beta2,
                     group["eps"], group["weight_decay"], self._decoupled, amsgrad, group["maximize"])
        state["step"] = step


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, param *= 1 - lr * weight_decay
    before the Adam update (default weight_decay=0.01)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)
