"""The data: scikit-learn's bundled 8x8 digits (no download) and the shifted task.

Pretraining task: the digits as they are.  Downstream task: the same kind of
images moved ``shift`` pixels down and right (zero-filled) -- a distribution
shift on which the pretrained MLP is near (or below) chance, and which
fine-tuning fixes.  Pretraining uses the training split; the downstream task
uses the same training images shifted, and is evaluated on the shifted test
split (images neither stage has seen).
"""

from collections import namedtuple

import numpy as np

from ._deps import require

Split = namedtuple("Split", ["x_train", "y_train", "x_test", "y_test"])
Tasks = namedtuple("Tasks", ["pretrain", "downstream"])


def shift_images(x, dy, dx):
    """x (n, 64) of 8x8 images -> the images moved dy rows down and dx columns right, zero-filled."""
    images = x.reshape(-1, 8, 8)
    out = np.zeros_like(images)
    out[:, dy:, dx:] = images[:, :8 - dy, :8 - dx]
    return out.reshape(x.shape)


def load_tasks(config):
    """Tasks(pretrain, downstream) of float32 inputs in [0, 1] and int64 labels."""
    datasets = require("sklearn.datasets", "scikit-learn")
    model_selection = require("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=config.test_fraction, random_state=config.seed, stratify=y)
    pretrain = Split(x_tr, y_tr, x_te, y_te)
    dy, dx = config.shift
    downstream = Split(shift_images(x_tr, dy, dx), y_tr, shift_images(x_te, dy, dx), y_te)
    return Tasks(pretrain, downstream)
