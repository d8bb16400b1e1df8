"""Loss modules: CrossEntropyLoss and MSELoss with explicit backward.

``loss = criterion(pred, target)`` returns a Python float ('mean'/'sum'
reductions) or an array ('none') and keeps what backward needs;
``criterion.backward()`` returns dL/dpred (times ``grad_output``, default 1)
to feed into ``model.backward``.  The math is in lorac.functional.
"""

from . import functional as F
from .module import Module


class _Loss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = F.check_reduction(reduction, type(self).__name__)
        self._ctx = None

    def backward(self, grad_output=1.0):
        """dL/dpred of the last forward (a scalar grad_output, or the loss's shape for 'none')."""
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called without a preceding forward() "
                               "(or twice for one forward)")
        grad = self._backward(self._ctx, grad_output)
        self._ctx = None
        return grad

    def extra_repr(self):
        return f"reduction={self.reduction!r}" if self.reduction != "mean" else ""


class CrossEntropyLoss(_Loss):
    """torch.nn.CrossEntropyLoss on logits (..., C) and integer targets (...).

    -log softmax(pred)[target], averaged over targets != ignore_index
    ('mean'), summed ('sum') or per target ('none')."""

    def __init__(self, reduction="mean", ignore_index=-100):
        super().__init__(reduction)
        self.ignore_index = F.check_int(ignore_index, "CrossEntropyLoss: ignore_index")

    def forward(self, pred, target):
        self._ctx = None
        loss, self._ctx = F.cross_entropy_with_context(pred, target, self.ignore_index, self.reduction)
        return loss

    @staticmethod
    def _backward(ctx, grad_output):
        return F.cross_entropy_backward_from_context(ctx, grad_output)

    def extra_repr(self):
        parts = [super().extra_repr()] + ([f"ignore_index={self.ignore_index}"] if self.ignore_index != -100 else [])
        return ", ".join(p for p in parts if p)


class MSELoss(_Loss):
    """torch.nn.MSELoss: (pred - target)^2, 'mean', 'sum' or 'none'."""

    def forward(self, pred, target):
        self._ctx = None
        loss, self._ctx = F.mse_loss_with_context(pred, target, self.reduction)
        return loss

    @staticmethod
    def _backward(ctx, grad_output):
        return F.mse_loss_backward_from_context(ctx, grad_output)
