"""Thread rules (lorac/layers/_threading.py): per-thread forward caches, a lock per layer."""

import copy
import os
import threading
import time

import numpy as np
import pytest

import lorac

N_THREADS = 8


@pytest.fixture
def one_blas_thread():
    before = lorac.get_num_threads()
    lorac.set_num_threads(1)
    yield
    lorac.set_num_threads(before)


def shared_model(dtype=np.float64):
    rng = np.random.default_rng(0)
    model = lorac.Sequential(lorac.Linear(24, 32, r=4, lora_alpha=8, dtype=dtype, rng=1),
                             lorac.MergedLinear(32, 48, r=2, enable_lora=[True, False, True], dtype=dtype, rng=2),
                             lorac.Linear(48, 5, r=3, dtype=dtype, rng=3))
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    return model


def run_in_threads(fn, args_list):
    results, errors = [None] * len(args_list), []

    def target(i):
        try:
            results[i] = fn(*args_list[i])
        except BaseException as exc:  # noqa: BLE001 - report it in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(args_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_eight_threads_on_shared_layers_match_serial_calls(one_blas_thread):
    model = shared_model()
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((7 + i, 24)) for i in range(N_THREADS)]
    grads = [rng.standard_normal((7 + i, 5)) for i in range(N_THREADS)]

    def step(x, g):
        outs = []
        for _ in range(20):
            y = model(x)
            outs.append((y, model.backward(g)))
        return outs

    serial = [step(x, g) for x, g in zip(inputs, grads)]
    serial_grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    threaded = run_in_threads(step, list(zip(inputs, grads)))
    for mine, ref in zip(threaded, serial):
        for (y, dx), (y_ref, dx_ref) in zip(mine, ref):
            np.testing.assert_array_equal(y, y_ref)    # bit-identical: each thread saw its own forward
            np.testing.assert_array_equal(dx, dx_ref)
    for name, param in model.named_parameters():
        if name in serial_grads:  # same sums, accumulated in another order
            np.testing.assert_allclose(param.grad, serial_grads[name], rtol=1e-12, atol=1e-12)


def test_merging_while_another_thread_runs_forward(one_blas_thread):
    layer = lorac.Linear(64, 48, r=8, lora_alpha=16, dtype=np.float64, rng=0)
    layer.lora_B.data[...] = np.random.default_rng(1).standard_normal(layer.lora_B.shape)
    w0 = layer.weight.data.copy()
    x = np.random.default_rng(2).standard_normal((33, 64))
    expected = layer(x)
    stop = threading.Event()
    bad = []

    def forward_loop():
        while not stop.is_set():
            y = layer(x)  # unmerged or merged: both give the same output, never a torn weight
            if not np.allclose(y, expected, rtol=1e-10, atol=1e-10):
                bad.append(np.max(np.abs(y - expected)))

    reader = threading.Thread(target=forward_loop)
    reader.start()
    try:
        for _ in range(300):
            layer.eval()
            layer.train()
    finally:
        stop.set()
        reader.join()
    assert not bad, f"forward saw a half-merged weight (max error {max(bad)})"
    assert not layer.merged
    np.testing.assert_allclose(layer.weight.data, w0, rtol=0, atol=1e-12)


def test_backward_pairs_with_its_own_threads_forward():
    layer = lorac.Linear(6, 4, r=2, dtype=np.float64, rng=0)
    x1, x2 = np.ones((2, 6)), np.full((5, 6), 2.0)
    layer(x1)
    run_in_threads(lambda: layer(x2), [()])  # another thread's forward does not replace ours
    assert layer.backward(np.ones((2, 4))).shape == (2, 6)


@pytest.mark.parametrize("make_layer", [
    lambda: lorac.Linear(6, 4, r=2, dtype=np.float64, rng=0),
    lambda: lorac.MergedLinear(6, 4, r=2, enable_lora=[True, False], dtype=np.float64, rng=0),
], ids=["Linear", "MergedLinear"])
def test_backward_refuses_a_forward_that_another_thread_merged_under(make_layer):
    """Merging clears only the merging thread's forward cache: a forward taken
    in another thread before the merge must be refused, not differentiated
    against the merged weight (its u and adapter no longer apply)."""
    layer = make_layer()
    x = np.ones((2, 6))
    layer(x)
    run_in_threads(lambda: layer.eval(), [()])
    assert layer.merged
    state = (layer.weight.data.copy(), layer.lora_A.grad, layer.lora_B.grad)
    with pytest.raises(RuntimeError, match="merged or unmerged"):
        layer.backward(np.ones((2, 4)))
    assert layer.lora_A.grad is state[1] and layer.lora_B.grad is state[2]
    np.testing.assert_array_equal(layer.weight.data, state[0])


@pytest.mark.skipif(os.environ.get("LORAC_UNDER_SANITIZER") == "1", reason="timing under ASan")
def test_kernels_release_the_gil(one_blas_thread):
    """Pure-Python work keeps its pace while another thread runs big forwards in C.

    Each forward takes ~100 ms; were the GIL held through it, the spinning
    thread would only get the interpreter between calls (one 5 ms switch
    interval per call) and slow down ~20x.  Released, it slows down only by
    sharing the machine (< 2x here)."""
    layer = lorac.Linear(2048, 2048, rng=0)
    x = np.ones((512, 2048), np.float32)
    layer(x)

    def spin():
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        return time.perf_counter() - start

    alone = min(spin() for _ in range(3))
    stop = threading.Event()

    def forwards():
        while not stop.is_set():
            layer(x)

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        time.sleep(0.05)
        shared = min(spin() for _ in range(3))
    finally:
        stop.set()
        worker.join()
    assert shared < 6 * alone, f"spin took {shared:.3f} s beside C forwards vs {alone:.3f} s alone"


def cast_to_float32(model):
    model.to(np.float32)


def load_ones(model):
    model.load_state_dict({k: np.ones_like(v) for k, v in model.state_dict().items()})


@pytest.mark.parametrize("operation", [copy.deepcopy, cast_to_float32, lorac.Module.state_dict, load_ones],
                         ids=["deepcopy", "to", "state_dict", "load_state_dict"])
def test_whole_model_operations_hold_every_layers_lock(operation):
    """While this thread holds the last layer's lock (as a merge would), a
    whole-model operation in another thread waits before touching any layer:
    it never copies, casts, saves or loads a model whose layers are half
    way through another thread's change."""
    model = shared_model()
    before = [p.data.copy() for p in model.parameters()]
    first_data = model[0].weight.data
    result = []
    with model[2]._exclusive():
        worker = threading.Thread(target=lambda: result.append(operation(model)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive(), "finished without waiting for the held lock"
        assert model[0].weight.data is first_data and model[0].weight.dtype == np.float64  # first layer untouched
        for param, old in zip(model.parameters(), before):
            np.testing.assert_array_equal(param.data, old)
    worker.join(10)
    assert not worker.is_alive() and len(result) == 1
