"""Module.to(dtype), float() and double(): every floating-point parameter and
gradient cast in place, the layers' dtype with them, all-or-nothing; and
to(device) / cpu() / cuda(), as torch's, for a library on the CPU only."""

import numpy as np
import pytest

import lorac


def build(dtype=np.float32):
    """Every layer kind with a dtype of its own, in one chain (dropout 0: outputs comparable)."""
    return lorac.Sequential(
        lorac.Linear(5, 6, r=2, lora_alpha=4, dtype=dtype, rng=0),
        lorac.LayerNorm(6, dtype=dtype),
        lorac.GELU(),
        lorac.MergedLinear(6, 6, r=2, enable_lora=[True, False, True], dtype=dtype, rng=1),
        lorac.MoLoRALinear(6, 4, r=4, num_experts=2, dtype=dtype, rng=2),
    )


def randomize(model, rng):
    """Non-zero adapters (B starts at zero), so the LoRA branch matters."""
    for _, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3


def train_step(model, x):
    y = model(x)
    return y, model.backward(np.ones_like(y))


def float64_twin(model):
    """The reference: the same model built in float64 and loaded from the state dict."""
    twin = build(np.float64)
    twin.load_state_dict(model.state_dict())
    twin.train(model.training)
    return twin


def test_double_casts_parameters_grads_and_layers_in_place(rng):
    model = build()
    randomize(model, rng)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    train_step(model, x)
    params = dict(model.named_parameters())
    before = {k: (p.data.copy(), None if p.grad is None else p.grad.copy()) for k, p in params.items()}

    assert model.double() is model
    assert dict(model.named_parameters()) == params  # the same Parameter objects, as in torch
    for key, p in params.items():
        data, grad = before[key]
        assert p.dtype == np.float64 and p.data.flags.c_contiguous and p.data.flags.writeable
        np.testing.assert_array_equal(p.data, data)  # float32 -> float64 is exact
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            assert p.grad.dtype == np.float64
            np.testing.assert_array_equal(p.grad, grad)
    assert [getattr(m, "dtype", None) for m in model] == [np.float64, np.float64, None, np.float64, np.float64]


def test_a_cast_model_computes_as_one_built_in_float64(rng):
    model = build()
    randomize(model, rng)
    twin = float64_twin(model)
    model.double()
    x = rng.standard_normal((3, 5))
    y, dx = train_step(model, x)
    y_ref, dx_ref = train_step(twin, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for (key, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            np.testing.assert_array_equal(p.grad, q.grad, err_msg=key)


def test_inputs_must_then_have_the_new_dtype(rng):
    model = build().double()
    with pytest.raises(TypeError, match="input must have dtype float64, got float32"):
        model(rng.standard_normal((3, 5)).astype(np.float32))


@pytest.mark.parametrize("layer", [0, 1, 3, 4])
def test_a_forward_before_the_cast_has_no_backward_after_it(rng, layer):
    model = build()
    x = rng.standard_normal((3, model[0].in_features)).astype(np.float32)
    h = model[:layer](x) if layer else x
    y = model[layer](h)
    model.double()
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        model[layer].backward(np.ones(y.shape))


def test_double_then_float_gives_back_the_same_bits(rng):
    model = build()
    randomize(model, rng)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    assert model.double().float() is model
    for key, value in model.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_casting_to_the_current_dtype_copies_nothing():
    model = build()
    arrays = [p.data for p in model.parameters()]
    model.to("float32")
    assert all(p.data is a for p, a in zip(model.parameters(), arrays))


def test_a_merged_layer_casts_and_unmerges_in_the_new_dtype(rng):
    layer = lorac.Linear(8, 6, r=2, rng=0)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    w0 = layer.weight.data.astype(np.float64)
    layer.eval()
    assert layer.merged
    layer.double()
    np.testing.assert_allclose(layer.state_dict()["weight"], w0, rtol=0, atol=1e-6)  # float32 merge rounding
    layer.train()
    assert not layer.merged and layer.weight.dtype == np.float64
    np.testing.assert_allclose(layer.weight.data, w0, rtol=0, atol=1e-6)


def test_named_adapters_cast_and_new_ones_take_the_new_dtype():
    layer = lorac.Linear(4, 3, r=2, rng=0)
    layer.add_adapter("other", r=3)
    layer.double()
    assert {p.dtype for p in layer.parameters()} == {np.dtype(np.float64)}
    layer.add_adapter("late", r=1)
    assert {p.dtype for p in layer.parameters()} == {np.dtype(np.float64)}


def test_embedding_casts(rng):
    emb = lorac.Embedding(7, 3, r=2, rng=0).double()
    assert emb.weight.dtype == np.float64
    assert emb(np.array([[1, 2], [3, 6]])).dtype == np.float64


def test_a_shared_parameter_is_cast_once_and_stays_shared():
    model = lorac.Sequential(lorac.Linear(3, 3, rng=0), lorac.Linear(3, 3, rng=1))
    model[1].weight = model[0].weight
    model.double()
    assert model[1].weight is model[0].weight and model[0].weight.dtype == np.float64
    assert model[1].bias.dtype == np.float64


def test_integer_parameters_are_left_alone():
    block = lorac.Module()
    block.counts = lorac.Parameter(np.arange(3), requires_grad=False)
    block.scale = lorac.Parameter(np.ones(2, np.float32))
    block.double()
    assert block.counts.dtype == np.arange(3).dtype and block.scale.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float16, "int32", "bogus", None, "f2", complex])
def test_unsupported_dtypes_raise_and_change_nothing(dtype):
    model = build()
    arrays = [p.data for p in model.parameters()]
    with pytest.raises(TypeError, match="to\\(dtype\\): dtype must be float32 or float64, got"):
        model.to(dtype)
    assert all(p.data is a for p, a in zip(model.parameters(), arrays))
    assert model[0].dtype == np.float32


class _FailingCopy(np.ndarray):
    """An array whose astype fails as if memory ran out."""

    def astype(self, *args, **kwargs):
        raise MemoryError("no memory for the cast")


def test_a_failed_cast_leaves_the_model_as_it_was(rng):
    model = build()
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y = model(x)
    arrays = [p.data for p in model.parameters()]
    model[4].lora_router.data = model[4].lora_router.data.view(_FailingCopy)  # the last layer's
    with pytest.raises(MemoryError):
        model.double()
    assert all(p.data is a or p is model[4].lora_router for p, a in zip(model.parameters(), arrays))
    assert all(getattr(m, "dtype", np.float32) == np.float32 for m in model)
    model.backward(np.ones_like(y))  # the forward before the failed cast still has its backward


def test_an_optimizer_built_before_the_cast_refuses_to_step_until_its_state_is_reloaded(rng):
    model = build()
    x = rng.standard_normal((3, 5)).astype(np.float32)
    opt = lorac.optim.Adam([p for p in model.parameters() if p.requires_grad])
    train_step(model, x)
    opt.step()
    model.double()
    train_step(model, x.astype(np.float64))
    with pytest.raises(TypeError, match="must have dtype float64, got float32"):
        opt.step()
    opt.load_state_dict(opt.state_dict())  # loading casts the state to the parameters' dtype, as torch's
    assert {v.dtype for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray)} == {
        np.dtype(np.float64)}
    opt.step()
    fresh = lorac.optim.Adam([p for p in model.parameters() if p.requires_grad])
    fresh.step()  # built after the cast, as torch advises


@pytest.mark.parametrize("dtype, expected", [(None, np.float32), ("float64", np.float64), (np.float32, np.float32)])
def test_layer_dtype_none_is_the_float32_default_as_in_torch(dtype, expected):
    assert lorac.Linear(3, 2, dtype=dtype).weight.dtype == expected


@pytest.mark.parametrize("dtype", ["bogus", "cpu", "f4,f4", np.int32])
def test_layer_refuses_a_dtype_it_cannot_use(dtype):
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        lorac.Linear(3, 2, dtype=dtype)


def unchanged(model, arrays):
    return all(p.data is a for p, a in zip(model.parameters(), arrays)) and model[0].dtype == np.float32


def cpu_device():
    return pytest.importorskip("torch").device("cpu")


@pytest.mark.parametrize("device", ["cpu", "cpu:0", "torch cpu"])
def test_to_the_cpu_is_a_no_op_that_returns_the_model(device, rng):
    """torch code's model.to(device) runs unchanged: lorac's arrays are on the CPU already."""
    device = cpu_device() if device == "torch cpu" else device
    model = build()
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y = model(x)
    arrays = [p.data for p in model.parameters()]
    for moved in (model.to(device), model.to(device=device), model.to(device, None),
                  model.to(device, non_blocking=True), model.cpu()):
        assert moved is model and unchanged(model, arrays)
    model.backward(np.ones_like(y))  # a forward before a no-op move keeps its backward


@pytest.mark.parametrize("call", [
    lambda m: m.to("cpu", np.float64), lambda m: m.to("cpu:0", dtype="float64"),
    lambda m: m.to(device="cpu", dtype=np.float64), lambda m: m.to(np.float64, non_blocking=False),
    lambda m: m.to(dtype="float64"), lambda m: m.to(cpu_device(), np.float64)])
def test_to_with_a_device_and_a_dtype_casts(call, rng):
    model = build()
    randomize(model, rng)
    x = rng.standard_normal((3, 5))
    expected = float64_twin(model)(x)
    assert call(model) is model
    assert all(p.dtype == np.float64 for p in model.parameters())
    np.testing.assert_allclose(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "meta", "torch meta"])
def test_another_device_raises_and_changes_nothing(device):
    if device == "torch meta":
        device = pytest.importorskip("torch").device("meta")
    model = build()
    arrays = [p.data for p in model.parameters()]
    for call in (lambda: model.to(device), lambda: model.to(device, np.float64),
                 lambda: model.to(device=device, dtype=np.float64)):
        with pytest.raises(ValueError, match="CPU only, so device must be 'cpu', got"):
            call()
        assert unchanged(model, arrays)
    with pytest.raises(ValueError, match="cuda\\(\\): lorac computes on the CPU only"):
        model.cuda()
    assert unchanged(model, arrays)


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, "needs a device \\('cpu'\\) or a dtype"),
    ((np.float64, "cpu"), {}, "first argument must be a device"),
    (("cpu", np.float64, False), {}, "at most 2 positional arguments"),
    (("cpu",), {"device": "cpu"}, "device both as an argument and as device="),
    ((np.float64,), {"dtype": np.float64}, "dtype both as an argument and as dtype="),
    (("cpu", np.float64), {"dtype": np.float64}, "dtype both as an argument and as dtype="),
    ((), {"device": "cpu", "memory_format": None}, "unexpected keyword arguments \\['memory_format'\\]"),
    ((np.float64,), {"non_blocking": 1}, "non_blocking\\): expected a bool, got 1"),
    (("cpu", "int32"), {}, "dtype must be float32 or float64, got 'int32'"),
    ((), {"device": None, "dtype": None}, "dtype must be float32 or float64, got None"),
])
def test_to_with_arguments_it_cannot_read_raises_type_error_and_changes_nothing(args, kwargs, message):
    model = build()
    arrays = [p.data for p in model.parameters()]
    with pytest.raises(TypeError, match=message):
        model.to(*args, **kwargs)
    assert unchanged(model, arrays)


@pytest.mark.parametrize("method", ["half", "bfloat16"])
def test_half_precision_casts_are_refused_and_change_nothing(method):
    model = build()
    arrays = [p.data for p in model.parameters()]
    with pytest.raises(TypeError, match=rf"{method}\(\): lorac computes in float32 or float64 only"):
        getattr(model, method)()
    assert unchanged(model, arrays)


def test_parameter_numel_counts_scalars_as_torch():
    assert lorac.Parameter(np.zeros((3, 4))).numel() == 12 == sum(p.numel() for p in [lorac.Parameter(np.ones(12))])
