"""LoRALayer: the hyper-parameters and merge bookkeeping every LoRA layer shares."""

import math

from .._arrays import non_negative_int, probability, real_number


class LoRALayer:
    """Mixin with loralib's attributes: r, lora_alpha, scaling, lora_dropout,
    merge_weights, merged (and use_rslora: scaling = lora_alpha / sqrt(r))."""

    def _init_lora(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora=False):
        self.r = non_negative_int(r, "r")
        self.lora_alpha = real_number(lora_alpha, "lora_alpha")
        self.lora_dropout = probability(lora_dropout, "lora_dropout")
        self.merge_weights = bool(merge_weights)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        if self.r > 0:
            self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        else:
            self.scaling = 0.0

    def train(self, mode=True):
        """train() unmerges and eval() merges the adapter when merge_weights is set."""
        super().train(mode)
        if mode:
            if self.merge_weights and self.merged:
                self.unmerge()
        elif self.merge_weights and not self.merged:
            self.merge()
        return self

    def merge(self):
        """Add scaling * B A into the base weight (no-op when already merged)."""
        if not self.merged:
            if self.r > 0:
                self._apply_delta(+self.scaling)
            self.merged = True

    def unmerge(self):
        """Subtract scaling * B A from the base weight (no-op when not merged)."""
        if self.merged:
            if self.r > 0:
                self._apply_delta(-self.scaling)
            self.merged = False

    def _apply_delta(self, alpha):
        raise NotImplementedError
