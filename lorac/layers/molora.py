"""lorac.MoLoRALinear: a Mixture of LoRA experts on one rank-r adapter, with
a learned router (forward and backward in C: csrc/lora_moe*)."""

from collections import namedtuple

import numpy as np

from .. import _C
from .. import init
from .._arrays import as_float_array, as_generator, as_rows, check_last_dim, float_dtype, non_negative_int, \
    probability, real_number
from ..module import Module, Parameter
from ._threading import ThreadState, locked
from ._grads import GradBuffers

# What backward needs from a forward: the 2-D input, u = drop(x) A^T, the
# router's probabilities and the gates, the dropout mask and 1 / (1 - p), the
# input's leading shape, and the armed auxiliary-loss gradient (or None).
_ForwardCache = namedtuple("_ForwardCache", ["x", "u", "probs", "gates", "mask", "keep_scale", "lead_shape", "aux"])


class MoLoRALinear(ThreadState, Module):
    """y = x W0^T + b + s * (u * expand(g)) B^T, u = dropout(x) A^T, g = router gates.

    The rank-r adapter (``lora_A`` (r, in), ``lora_B`` (out, r)) is split
    into ``num_experts`` blocks of r / num_experts ranks ("a router splits the
    rank into blocks"); expert e owns ranks [e r/E, (e + 1) r/E).  The
    trainable router ``lora_router`` (num_experts, in) (a "lora_" name, so
    ``lora_state_dict`` keeps it) gives each row its gates
    ``g = softmax(x W_r^T)``; with ``top_k`` set, only each row's top_k
    logits are kept and the softmax renormalises over them (the others get
    gate 0).  s = lora_alpha / r (or / sqrt(r) with ``use_rslora``).  The base
    ``weight`` (out, in) is frozen; ``bias`` (out,) trains unless frozen.

    Init: weight and bias as nn.Linear; lora_A and lora_router
    kaiming-uniform, lora_B zero (the layer starts as its base).  Dropout
    (training only) applies to the adapter's input, not the router's.

    ``load_balancing_loss(coef)`` after a forward returns Switch
    Transformer's auxiliary loss and adds its gradient to the next backward.
    With top_k = 1 the renormalised gate is always 1, so the router learns
    from the auxiliary loss only (as in Switch); use top_k >= 2 or dense
    gates (None) for the task loss to train it.
    The gates depend on the input, so the adapter cannot be merged into the
    weight (``eval()`` changes only dropout); mixed batches and named
    adapters are for the plain LoRA layers.
    """

    _mixed_batch_unsupported = True  # lorac.adapters refuses adapter_names / adapter_ids

    def __init__(self, in_features, out_features, r, num_experts, top_k=None, lora_alpha=1, lora_dropout=0.0,
                 bias=True, dtype=np.float32, rng=None, use_rslora=False):
        Module.__init__(self)
        self.in_features = non_negative_int(in_features, "in_features")
        self.out_features = non_negative_int(out_features, "out_features")
        self.r = non_negative_int(r, "r")
        self.num_experts = non_negative_int(num_experts, "num_experts")
        if self.r == 0:
            raise ValueError("MoLoRALinear: r must be >= 1, got 0")
        if self.num_experts == 0 or self.r % self.num_experts:
            raise ValueError(f"MoLoRALinear: num_experts must be >= 1 and divide r = {self.r}, got {num_experts}")
        if top_k is not None:
            top_k = non_negative_int(top_k, "top_k")
            if not 1 <= top_k <= self.num_experts:
                raise ValueError(f"MoLoRALinear: top_k must be None or in [1, num_experts] = "
                                 f"[1, {self.num_experts}], got {top_k}")
        self.top_k = top_k
        self.lora_alpha = real_number(lora_alpha, "lora_alpha")
        self.lora_dropout = probability(lora_dropout, "lora_dropout")
        if not isinstance(use_rslora, (bool, np.bool_)):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (np.sqrt(self.r) if self.use_rslora else self.r)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None
        self.last_gates = None

        fan_in = self.in_features
        self.weight = Parameter(init.kaiming_uniform((self.out_features, fan_in), fan_in, self.rng, self.dtype),
                                requires_grad=False)
        if bias:
            bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
            self.bias = Parameter(init.uniform((self.out_features,), bound, self.rng, self.dtype))
        else:
            self.register_parameter("bias", None)
        self.lora_A = Parameter(init.kaiming_uniform((self.r, fan_in), fan_in, self.rng, self.dtype))
        self.lora_B = Parameter(init.zeros((self.out_features, self.r), self.dtype))
        self.lora_router = Parameter(init.kaiming_uniform((self.num_experts, fan_in), fan_in, self.rng, self.dtype))

    # -- forward / backward ---------------------------------------------
    @locked
    def forward(self, x):
        if type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim == 0 \
                or x.shape[-1] != self.in_features:
            name = f"{type(self).__name__}.forward: input"
            x = as_float_array(x, self.dtype, name)
            check_last_dim(x, self.in_features, name)
        params = self._parameters
        x2 = x if x.ndim == 2 else as_rows(x)
        mask = None
        if self.training and self.lora_dropout:
            mask = (self.rng.random(x2.shape, dtype=np.float32) >= self.lora_dropout).view(np.uint8)
        keep_scale = 1.0 / (1.0 - self.lora_dropout)
        bias = params["bias"]
        y, u, probs, gates = _C.molora_forward(
            x2, params["weight"].data, None if bias is None else bias.data, params["lora_A"].data,
            params["lora_B"].data, params["lora_router"].data, self.scaling, self._k(), mask, keep_scale)
        lead_shape = x.shape[:-1]
        self._cache = _ForwardCache(x2, u, probs, gates, mask, keep_scale, lead_shape, None)
        self.last_gates = gates.reshape(lead_shape + (self.num_experts,))
        return y.reshape(lead_shape + (self.out_features,))

    def _k(self):
        return self.num_experts if self.top_k is None else self.top_k

    @locked
    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters
        (router included, plus the load-balancing loss if armed)."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called without a preceding forward() "
                               "(or twice for one forward)")
        expected = cache.lead_shape + (self.out_features,)
        g = grad_output
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            name = f"{type(self).__name__}.backward: grad_output"
            g = as_float_array(g, self.dtype, name)
            if g.shape != expected:
                raise ValueError(f"{name} must have shape {expected} (the output's), got {g.shape}")
        params = self._parameters
        grads = {"grad_weight": params["weight"], "grad_bias": params["bias"], "grad_lora_A": params["lora_A"],
                 "grad_lora_B": params["lora_B"], "grad_lora_router": params["lora_router"]}
        with GradBuffers(grads) as buffers:
            dx = _C.molora_backward(
                as_rows(g), cache.x, params["weight"].data, params["lora_A"].data,
                params["lora_B"].data, params["lora_router"].data, cache.u, cache.probs, cache.gates,
                self.scaling, self._k(), cache.mask, cache.keep_scale, cache.aux, True, **buffers)
        self._cache = None
        return dx.reshape(cache.lead_shape + (self.in_features,))

    def load_balancing_loss(self, coef=1.0):
        """Switch Transformer's auxiliary loss of the last forward, times coef:

            coef * E * sum_e f_e P_e

        with P_e the mean router probability of expert e over the rows and
        f_e the share of routing slots it got (each row sends to its top_k
        experts, to its top-1 without top_k): 1 at a perfectly even split,
        up to E when one expert takes everything.  f is not differentiable;
        the gradient flows through P to the router.  Calling it arms the next
        backward() to add that gradient (a second call replaces the first).
        Returns the loss as a float."""
        coef = real_number(coef, "coef")
        cache = self._cache
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.load_balancing_loss() needs a forward() first "
                               "(and must come before backward())")
        n, experts = cache.probs.shape
        if n == 0:
            return 0.0
        probs = cache.probs.astype(np.float64)
        if self.top_k is None:
            chosen = np.zeros_like(probs, dtype=bool)
            chosen[np.arange(n), np.argmax(probs, axis=1)] = True
            k = 1
        else:
            chosen, k = cache.gates > 0, self.top_k
        f = chosen.sum(axis=0) / (n * k)
        P = probs.mean(axis=0)
        loss = coef * experts * float(f @ P)
        # d loss / d probs[i, e] = coef * E * f_e / n: the kernel adds probs * (aux - rowsum(probs * aux))
        self._cache = cache._replace(aux=coef * experts * f / n)
        return loss

    # -- merging (not possible) -------------------------------------------
    def merge(self):
        raise RuntimeError("MoLoRALinear cannot merge its adapter into the weight: the gates depend on the input")

    def extra_repr(self):
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, num_experts={self.num_experts}")
        if self.top_k is not None:
            text += f", top_k={self.top_k}"
        text += f", lora_alpha={self.lora_alpha:g}"
        if self.lora_dropout:
            text += f", lora_dropout={self.lora_dropout:g}"
        if self.use_rslora:
            text += ", use_rslora=True"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text
