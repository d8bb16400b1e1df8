"""DemoConfig: every knob of the demo, with the default and --quick presets."""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (all runs are seeded by ``seed``)."""

    seed: int = 0
    hidden: int = 512                 # MLP 64-hidden-hidden-10
    ranks: tuple = (1, 2, 4, 8, 16, 64)
    lora_alpha: float = 16.0          # scaling = lora_alpha / r (LoRA paper: alpha fixed across r)
    pretrain_epochs: int = 20
    finetune_epochs: int = 20
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    full_ft_lr: float = 1e-3
    lora_lr: float = 5e-3             # adapters start at zero: a larger step is usual for LoRA
    weight_decay: float = 0.01        # AdamW everywhere
    test_fraction: float = 0.3
    shift: tuple = (2, 2)             # downstream task: images moved down/right, zero-filled
    memory_steps: int = 3             # training steps traced by tracemalloc per configuration
    latency_repeats: int = 30         # merged vs unmerged inference timing
    d90_fraction: float = 0.9         # d90: smallest r reaching this fraction of full FT accuracy
    threads: int = 1                  # OpenBLAS threads during the demo: its matrices are small
                                      # (batch 64), threads gain little and, on a busy machine,
                                      # spinning BLAS threads cost many times the work
    progress: bool = True             # tqdm bars (shown only on a terminal)
    plots: bool = True
    # lorac demo --similarity (similarity.py): the LoRA paper's phi(i, j) figure in small
    similarity_ranks: tuple = (8, 64)        # the two ranks compared (r = 64 also trained with a second seed)
    similarity_layers: tuple = ("0", "2", "4")  # heatmap layers: all three (none cherry-picked)
    # lorac demo --inits (inits.py): the LoRA initialisations side by side
    inits_rank: int = 8
    similarity_repeats: int = 5              # independent repetitions (spread of phi across seeds)

    def with_(self, **changes):
        return replace(self, **changes)


def default_config(**changes):
    """The full demo (a few minutes at most on 2 cores)."""
    return DemoConfig().with_(**changes)


def quick_config(**changes):
    """--quick: the same experiment with fewer epochs (well under 30 s)."""
    return DemoConfig(pretrain_epochs=8, finetune_epochs=8, latency_repeats=10,
                      similarity_repeats=1).with_(**changes)
