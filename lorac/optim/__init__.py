"""lorac.optim: torch.optim's SGD, Adam and AdamW on fused C update kernels.

::

    opt = lorac.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in batches:
        loss = criterion(model(x), y)
        model.backward(criterion.backward())
        opt.step()
        opt.zero_grad()

State (momentum, moments) is created only for parameters that train
(``requires_grad`` and a gradient): a frozen base weight costs no optimizer
memory, which is where most of LoRA's training-memory saving comes from.
``lorac.optim.lr_scheduler`` has torch's common learning-rate schedules, and
``get_{constant,linear,cosine}_schedule_with_warmup`` Hugging Face's warm-ups,
``create_loraplus_optimizer`` PEFT's LoRA+ (a larger learning rate for lora_B).
"""

from . import lr_scheduler
from .adam import Adam, AdamW
from .loraplus import create_loraplus_optimizer
from .optimizer import Optimizer
from .sgd import SGD
from .warmup import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "create_loraplus_optimizer", "lr_scheduler",
           "get_constant_schedule_with_warmup", "get_linear_schedule_with_warmup", "get_cosine_schedule_with_warmup"]
