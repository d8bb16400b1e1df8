"""The seeds' loralib workflow with lorac: swap the layers, train only the adapter,
save it on its own, load base + adapter back with strict=False.

    python examples/quickstart.py [--out DIR]
"""

import argparse
import os
import tempfile

import numpy as np

import lorac


def make_model(r, rng):
    # lorac.Linear(in, out, r=16) in place of nn.Linear(in, out); r=0 is a plain layer
    return lorac.Sequential(lorac.Linear(64, 256, r=r, lora_alpha=2 * r, rng=rng),
                            lorac.Linear(256, 10, r=r, lora_alpha=2 * r, rng=rng))


def mse_step(model, x, target, lr):
    """One plain SGD step on 0.5 * mean squared error; returns the loss."""
    y = model(x)
    diff = y - target
    model.zero_grad()
    model.backward(diff / len(x))
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            p.data -= lr * p.grad
    return 0.5 * float(np.mean(np.sum(diff * diff, axis=1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lorac-quickstart-")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    target = np.tanh(x @ rng.standard_normal((64, 10)).astype(np.float32))

    # "pretrained" base weights, saved as a full state dict
    pretrained = make_model(r=0, rng=1)
    pretrained_path = os.path.join(out, "pretrained.safetensors")
    lorac.save(pretrained.state_dict(), pretrained_path)

    # the LoRA model: base weights loaded, only the adapter trains
    model = make_model(r=16, rng=2)
    model.load_state_dict(lorac.load(pretrained_path), strict=False)
    lorac.mark_only_lora_as_trainable(model)
    total = lorac.count_parameters(model)
    trainable = lorac.count_parameters(model, trainable_only=True)
    print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.1f}%)")

    first = mse_step(model, x, target, lr=0.05)
    for _ in range(args.steps - 1):
        last = mse_step(model, x, target, lr=0.05)
    print(f"training loss: {first:.4f} -> {last:.4f}")

    adapter_path = os.path.join(out, "lora.safetensors")
    lorac.save(lorac.lora_state_dict(model), adapter_path)
    print(f"checkpoint bytes: adapter {os.path.getsize(adapter_path):,} vs "
          f"full model {os.path.getsize(pretrained_path):,}")

    # a fresh model: pretrained checkpoint first, then the LoRA checkpoint
    fresh = make_model(r=16, rng=3)
    fresh.load_state_dict(lorac.load(pretrained_path), strict=False)
    fresh.load_state_dict(lorac.load(adapter_path), strict=False)
    model.eval()
    fresh.eval()  # eval() merges the adapter: no extra latency at inference
    same = np.allclose(model(x), fresh(x), rtol=1e-6, atol=1e-6)
    print(f"reloaded model matches the trained one: {same}")
    print(f"checkpoints in {out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
