"""torch.optim.lr_scheduler's common schedules, for lorac's optimizers.

    opt = lorac.optim.AdamW(model.parameters(), lr=1e-3)
    sched = lorac.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in batches:
        ...
        opt.step()
        sched.step()

As torch's: building a scheduler records each group's 'initial_lr' and sets
the learning rate of epoch 0; step() moves to the next epoch and writes every
group's 'lr'; get_last_lr(), state_dict() and load_state_dict() are there.
Each schedule is computed in closed form from the epoch (torch's chainable
forms give the same values unless group['lr'] is changed by hand between
steps, which these schedules overwrite).  A learning rate that is not a
finite number >= 0 (from a LambdaLR's function) raises ValueError and no
group changes.
"""

import bisect
import math
import numbers
import types

from .optimizer import Optimizer, check_real


def _positive_int(value, what, owner):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {what} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{owner}: {what} must be > 0, got {value}")
    return int(value)


class LRScheduler:
    """Base class: subclasses define lr_at(base_lr, group_index) for self.last_epoch."""

    def __init__(self, optimizer, last_epoch=-1):
        owner = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{owner}: optimizer must be a lorac.optim optimizer, got {type(optimizer).__name__}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"{owner}: last_epoch must be an int >= -1, got {last_epoch!r}")
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"{owner}: param_groups[{i}] has no 'initial_lr', which resuming "
                                   f"(last_epoch={last_epoch}) needs: build the scheduler with last_epoch=-1")
        self.optimizer = optimizer
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = int(last_epoch)
        self.step()

    def lr_at(self, base_lr, index):
        raise NotImplementedError

    def step(self):
        """Move to the next epoch and set every group's learning rate for it."""
        epoch = self.last_epoch + 1
        self.last_epoch = epoch
        try:
            lrs = [self._checked(self.lr_at(base, i), i) for i, base in enumerate(self.base_lrs)]
        except BaseException:
            self.last_epoch = epoch - 1
            raise
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def _checked(self, lr, index):
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{type(self).__name__}: the learning rate of group {index} at epoch "
                             f"{self.last_epoch} must be a finite number >= 0, got {lr!r}")
        return float(lr)

    def get_last_lr(self):
        """The learning rates the last step() set, one per group."""
        return list(self._last_lr)

    def state_dict(self):
        """Everything but the optimizer (and, for LambdaLR, plain functions)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        if not isinstance(state_dict, dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict(): expected a dict, "
                            f"got {type(state_dict).__name__}")
        owner = f"{type(self).__name__}.load_state_dict()"
        unknown = set(state_dict) - (set(self.__dict__) - {"optimizer"})
        if unknown:
            raise ValueError(f"{owner}: unexpected keys {sorted(unknown)}")
        state = dict(state_dict)
        if "last_epoch" in state:
            epoch = state["last_epoch"]
            if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < -1:
                raise ValueError(f"{owner}: last_epoch must be an int >= -1, got {epoch!r}")
        for key in ("base_lrs", "_last_lr"):
            if key in state:
                lrs = list(state[key])
                if len(lrs) != len(self.optimizer.param_groups):
                    raise ValueError(f"{owner}: {key} has {len(lrs)} entries, the optimizer "
                                     f"{len(self.optimizer.param_groups)} groups")
                state[key] = [check_real(lr, key, owner, minimum=0) for lr in lrs]
        self.__dict__.update(state)


class LambdaLR(LRScheduler):
    """lr = initial_lr * lr_lambda(epoch); one function, or one per group."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        groups = len(optimizer.param_groups) if isinstance(optimizer, Optimizer) else 0
        lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * groups
        if len(lambdas) != groups:
            raise ValueError(f"LambdaLR: expected {groups} lr_lambdas (one per group), got {len(lambdas)}")
        if not all(callable(f) for f in lambdas):
            raise TypeError("LambdaLR: lr_lambda must be a callable or a list of callables")
        self.lr_lambdas = lambdas
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        return base_lr * self.lr_lambdas[index](self.last_epoch)

    def state_dict(self):
        """As torch's: a function is saved as None; a callable object by its __dict__."""
        state = super().state_dict()
        state["lr_lambdas"] = [None if isinstance(f, types.FunctionType) else dict(getattr(f, "__dict__", {}))
                               for f in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", [None] * len(self.lr_lambdas))
        super().load_state_dict(state)
        for f, attrs in zip(self.lr_lambdas, saved):
            if attrs is not None:
                f.__dict__.update(attrs)


class StepLR(LRScheduler):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = _positive_int(step_size, "step_size", "StepLR")
        self.gamma = check_real(gamma, "gamma", "StepLR", minimum=0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        return base_lr * self.gamma ** (self.last_epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """lr = initial_lr * gamma ** (number of milestones <= epoch)."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        milestones = list(milestones)
        for m in milestones:
            _positive_int(m, "each milestone", "MultiStepLR")
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = check_real(gamma, "gamma", "MultiStepLR", minimum=0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, self.last_epoch)


class ExponentialLR(LRScheduler):
    """lr = initial_lr * gamma ** epoch."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = check_real(gamma, "gamma", "ExponentialLR", minimum=0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        return base_lr * self.gamma ** self.last_epoch


class LinearLR(LRScheduler):
    """lr = initial_lr * factor, the factor going linearly from start_factor
    to end_factor over total_iters epochs, then staying (a warm-up)."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, last_epoch=-1):
        start = check_real(start_factor, "start_factor", "LinearLR", minimum=0, maximum=1)
        if start == 0:
            raise ValueError("LinearLR: start_factor must be > 0 and <= 1, got 0")
        self.start_factor = start
        self.end_factor = check_real(end_factor, "end_factor", "LinearLR", minimum=0, maximum=1)
        self.total_iters = _positive_int(total_iters, "total_iters", "LinearLR")
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        done = min(self.last_epoch, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * done)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = _positive_int(T_max, "T_max", "CosineAnnealingLR")
        self.eta_min = check_real(eta_min, "eta_min", "CosineAnnealingLR", minimum=0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, index):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
