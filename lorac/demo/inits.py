"""`lorac demo --inits`: the LoRA initialisations side by side on the demo's task.

The demo MLP (64-512-512-10) is pretrained on the digits as in the main
demo; then, for each initialisation, a fresh copy gets rank-``inits_rank``
adapters on its three Linear layers through ``lorac.get_peft_model`` and
trains on the shifted digits with the same optimiser, learning rate, epochs,
seed and minibatch order.  Only the start differs:

- "kaiming" (loralib / PEFT's default), "gaussian", "orthogonal": random
  starts that leave the model unchanged;
- "pissa", "olora": the adapter takes the top of the weight's SVD / QR and
  the base the residual;
- "mica": B the weight's minor singular directions, A = 0, only A trains;
- "eva": A from the principal directions of each layer's inputs
  (``initialize_lora_eva_weights`` on the training images), ranks
  redistributed by explained variance;
- "corda ipm" / "corda kpm": the SVD of each weight times its inputs'
  covariance (``preprocess_corda``), top / bottom directions;
- "lora_ga": the singular directions of the full fine-tuning gradient over
  a few batches (``preprocess_loraga``).

Every init gets the same ranks: ``inits_rank`` on the two hidden layers and
at most 4 on the 10-output head (LoRA-GA takes 2r of its singular
directions, "orthogonal" needs an even r).  The data-driven inits read the same 8 training minibatches.

The table gives test accuracy after the first epoch, after a quarter of
them and at the end, the trainable parameters and the seconds the init
itself took.  One seed on one small task: it shows the methods working end
to end, not which is best in general.  The learning rate is the one the
main demo uses for zero-start LoRA; the SVD-based starts may prefer a
smaller one.  It writes inits.json and inits.txt.
"""

import time
from dataclasses import asdict

import numpy as np

from ..config import get_num_threads
from ..losses import CrossEntropyLoss
from ..peft import CordaConfig, EvaConfig, LoraConfig, LoraGAConfig, get_peft_model
from ..peft.corda import preprocess_corda
from ..peft.eva import initialize_lora_eva_weights
from ..peft.loraga import preprocess_loraga
from ..utils import count_parameters
from .data import load_tasks
from .model import build_mlp
from .train import fit, minibatches

TARGETS = ["0", "2", "4"]
CALIBRATION_BATCHES = 8   # minibatches the data-driven inits read
HEAD_RANK = 4             # the 10-output head: LoRA-GA takes 2r <= 10 of its directions, orthogonal an even r


def run(config, out_dir, log=print):
    """Run the comparison; writes inits.json and inits.txt to out_dir.  Returns (results dict, table text)."""
    import os

    from . import run_and_report

    os.makedirs(out_dir, exist_ok=True)
    return run_and_report(config, out_dir, "inits", run_inits, inits_text, lambda results: [], log)


def init_names():
    return ("kaiming", "gaussian", "orthogonal", "pissa", "olora", "mica", "eva", "corda ipm", "corda kpm",
            "lora_ga")


def _config(name, config):
    method = name.split()[0]
    sub = {}
    if method == "eva":
        sub = dict(eva_config=EvaConfig())
    elif method == "corda":
        sub = dict(corda_config=CordaConfig(corda_method=name.split()[-1]))
    elif method == "lora_ga":
        sub = dict(lora_ga_config=LoraGAConfig())
    init = True if method == "kaiming" else method
    head = min(config.inits_rank, HEAD_RANK)
    return LoraConfig(r=config.inits_rank, lora_alpha=config.lora_alpha, target_modules=TARGETS,
                      rank_pattern={"4": head} if head != config.inits_rank else {}, init_lora_weights=init, **sub)


def adapted_model(name, pretrained, config, split, seed):
    """(model, seconds): the pretrained MLP with rank-r adapters started by init `name`."""
    model = build_mlp(config.hidden, seed=seed)
    model.load_state_dict(pretrained)
    lora_config = _config(name, config)
    order = minibatches(len(split.x_train), config.batch_size, np.random.default_rng(seed))
    picks = [idx for _, idx in zip(range(CALIBRATION_BATCHES), order)]
    batches, labels = [split.x_train[idx] for idx in picks], [split.y_train[idx] for idx in picks]
    start = time.perf_counter()
    if lora_config.init_lora_weights == "corda":
        preprocess_corda(model, lora_config, run_model=lambda: [model(x) for x in batches])
    if lora_config.init_lora_weights == "lora_ga":
        loss_fn = CrossEntropyLoss()

        def train_step():
            for x, y in zip(batches, labels):
                loss_fn(model(x), y)
                model.backward(loss_fn.backward())
        preprocess_loraga(model, lora_config, train_step)
    get_peft_model(model, lora_config, rng=seed)
    if lora_config.init_lora_weights == "eva":
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model, time.perf_counter() - start


def run_inits(config, out_dir, log=print):
    """Pretrain, then fine-tune once per initialisation; returns the results dict."""
    tasks = load_tasks(config)
    down = tasks.downstream
    seed = config.seed
    log(f"[1/2] pretraining a 64-{config.hidden}-{config.hidden}-10 MLP on the digits")
    pretrained_model = build_mlp(config.hidden, seed=seed)
    fit(pretrained_model, tasks.pretrain, config.pretrain_epochs, config.pretrain_lr, config, seed, "pretrain")
    pretrained = {k: v.copy() for k, v in pretrained_model.state_dict().items()}
    log(f"[2/2] LoRA r={config.inits_rank} from each initialisation, {config.finetune_epochs} epochs, "
        f"lr {config.lora_lr:g}")
    runs = []
    quarter = max(1, config.finetune_epochs // 4)
    for name in init_names():
        model, seconds = adapted_model(name, pretrained, config, down, seed + 2)
        history = fit(model, down, config.finetune_epochs, config.lora_lr, config, seed + 1, name)
        ranks = sorted({model.get_submodule(p).r for p in TARGETS})
        runs.append({
            "init": name,
            "ranks": ranks,
            "trainable_params": count_parameters(model, trainable_only=True),
            "init_seconds": seconds,
            "accuracy_first_epoch": history.test_accuracy[0],
            "accuracy_quarter": history.test_accuracy[quarter - 1],
            "test_accuracy": history.test_accuracy[-1],
            "history": asdict(history),
        })
        log(f"      {name:<10s} test accuracy {100 * history.test_accuracy[-1]:.1f}%")
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "threads": get_num_threads(), "quarter_epoch": quarter, "runs": runs}


def inits_text(results):
    """The comparison table."""
    quarter = results["quarter_epoch"]
    epochs = results["config"]["finetune_epochs"]
    lines = [f"init        ranks   trainable  init s  acc ep 1  acc ep {quarter:<2d}  acc ep {epochs:<3d}",
             "----------  ------  ---------  ------  --------  ---------  ----------"]
    for run in results["runs"]:
        ranks = ",".join(map(str, run["ranks"]))
        lines.append(f"{run['init']:<10s}  {ranks:<6s}  {run['trainable_params']:>9,}  {run['init_seconds']:6.2f}  "
                     f"{100 * run['accuracy_first_epoch']:7.1f}%  {100 * run['accuracy_quarter']:8.1f}%  "
                     f"{100 * run['test_accuracy']:9.1f}%")
    lines.append(f"(one seed; the same optimiser, lr {results['config']['lora_lr']:g}, minibatches and epochs for "
                 "every init; eva's ranks are redistributed, mica trains lora_A only)")
    return "\n".join(lines)
