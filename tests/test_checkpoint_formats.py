"""lorac.checkpoint: round trips, format detection, torch files, atomic saves."""

import os
import pathlib
import stat

import numpy as np
import pytest

from lorac import checkpoint as ck
from lorac.checkpoint import npz_format, safetensors_format

SUFFIXES = [".safetensors", ".npz", ""]  # "" -> safetensors, the default

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.int16, np.int8,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


def sample(dtype, shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, size=shape).astype(dtype)


def assert_same(loaded, expected):
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        value = np.asarray(value)
        out = loaded[key]
        assert isinstance(out, np.ndarray), key
        assert out.dtype == value.dtype, (key, out.dtype, value.dtype)
        assert out.shape == value.shape, key
        assert out.flags.c_contiguous and out.flags.writeable, key
        np.testing.assert_array_equal(out, value, err_msg=key)


# -- round trips --------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_dtypes(tmp_path, suffix, dtype):
    sd = {"layer.lora_A": sample(dtype, (2, 5)), "layer.lora_B": sample(dtype, (5, 2), seed=1)}
    path = tmp_path / f"ckpt{suffix}"
    ck.save(sd, path)
    assert_same(ck.load(path), sd)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_shapes(tmp_path, suffix):
    sd = {
        "scalar": np.array(3.5, dtype=np.float32),          # 0-d stays 0-d
        "int_scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float64),
        "empty2d": np.zeros((4, 0), dtype=np.float32),
        "big": sample(np.float64, (7, 3, 2)),
    }
    path = tmp_path / f"ckpt{suffix}"
    ck.save(sd, path)
    assert_same(ck.load(path), sd)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_state_dict(tmp_path, suffix):
    path = tmp_path / f"ckpt{suffix}"
    ck.save({}, path)
    assert ck.load(path) == {}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_float16_loads_as_float32(tmp_path, suffix):
    half = np.array([[0.5, -2.0], [65504.0, 1e-3]], dtype=np.float16)
    path = tmp_path / f"ckpt{suffix}"
    ck.save({"h": half}, path)
    out = ck.load(path)["h"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, half.astype(np.float32))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_accepts_parameters_lists_views_and_big_endian(tmp_path, suffix):
    class Param:  # what lorac.Parameter looks like to save()
        def __init__(self, data):
            self.data = data

    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    sd = {
        "param": Param(base[:2]),
        "list": [[1.0, 2.0], [3.0, 4.0]],
        "transposed": base.T,                       # non-contiguous input
        "strided": base[::2, ::3],
        "big_endian": base.astype(">f4"),
    }
    path = tmp_path / f"ckpt{suffix}"
    ck.save(sd, path)
    out = ck.load(path)
    np.testing.assert_array_equal(out["param"], base[:2])
    np.testing.assert_array_equal(out["list"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(out["transposed"], base.T)
    np.testing.assert_array_equal(out["strided"], base[::2, ::3])
    assert out["big_endian"].dtype == np.dtype("float32")
    np.testing.assert_array_equal(out["big_endian"], base.astype(np.float32))


def test_save_overwrites_and_keeps_permissions(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    ck.save({"a": np.zeros(3)}, path)
    os.chmod(path, 0o640)
    ck.save({"b": np.ones(2)}, path)
    assert_same(ck.load(path), {"b": np.ones(2)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]


def test_paths_may_be_str_or_pathlike(tmp_path):
    ck.save({"a": np.ones(2)}, str(tmp_path / "a.npz"))
    assert_same(ck.load(pathlib.Path(tmp_path) / "a.npz"), {"a": np.ones(2)})


# -- metadata -----------------------------------------------------------------

def test_metadata_round_trip(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    meta = {"r": "8", "lora_alpha": "16", "note": "héllo"}
    ck.save({"a": np.ones(2, np.float32)}, path, metadata=meta)
    assert ck.read_metadata(path) == meta
    ck.save({"a": np.ones(2, np.float32)}, path)
    assert ck.read_metadata(path) == {}


def test_metadata_empty_for_other_formats(tmp_path):
    ck.save({"a": np.ones(2)}, tmp_path / "a.npz")
    assert ck.read_metadata(tmp_path / "a.npz") == {}


@pytest.mark.parametrize("bad", [{"r": 8}, {1: "x"}, {"a": None}, ["r", "8"]])
def test_metadata_must_be_str_to_str(tmp_path, bad):
    with pytest.raises(TypeError, match="metadata"):
        ck.save({"a": np.ones(2)}, tmp_path / "a.safetensors", metadata=bad)
    assert not os.listdir(tmp_path)


def test_metadata_refused_for_npz(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        ck.save({"a": np.ones(2)}, tmp_path / "a.npz", metadata={"r": "8"})


# -- what save refuses --------------------------------------------------------

@pytest.mark.parametrize("value", [
    np.array([{"x": 1}], dtype=object),
    np.array(["text"]),
    np.ones(2, dtype=np.complex64),
    np.array(["2020-01-01"], dtype="datetime64[D]"),
], ids=["object", "str", "complex", "datetime"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_refuses_unsupported_dtypes(tmp_path, suffix, value):
    with pytest.raises(TypeError, match="'bad'"):
        ck.save({"ok": np.ones(1), "bad": value}, tmp_path / f"x{suffix}")
    assert not os.listdir(tmp_path)


def test_save_refuses_bad_keys_and_containers(tmp_path):
    with pytest.raises(TypeError, match="keys must be str"):
        ck.save({1: np.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="mapping"):
        ck.save([np.ones(1)], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        ck.save({"__metadata__": np.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="NUL"):
        ck.save({"a\0b": np.ones(1)}, tmp_path / "x.npz")
    assert not os.listdir(tmp_path)


def test_npz_names_that_clash_with_savez_arguments(tmp_path):
    sd = {"file": np.ones(2), "allow_pickle": np.zeros(1), "arr_0": np.ones(1), "a/b.c": np.ones(3)}
    ck.save(sd, tmp_path / "x.npz")
    assert_same(ck.load(tmp_path / "x.npz"), sd)


def test_reads_npz_written_by_numpy(tmp_path):
    a, b = sample(np.float32, (3, 3)), np.asfortranarray(sample(np.float64, (4, 2)))
    np.savez(tmp_path / "plain.npz", a=a, b=b)
    np.savez_compressed(tmp_path / "comp.npz", a=a, b=b)
    for name in ("plain.npz", "comp.npz"):
        assert_same(ck.load(tmp_path / name), {"a": a, "b": b})


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        ck.detect_format(tmp_path / "nope.safetensors")


# -- detection ignores names ----------------------------------------------------

def test_detect_format_ignores_file_names(tmp_path):
    sd = {"a": sample(np.float32)}
    ck.save(sd, tmp_path / "real.safetensors")
    ck.save(sd, tmp_path / "real.npz")
    os.rename(tmp_path / "real.safetensors", tmp_path / "x.npz")
    os.rename(tmp_path / "real.npz", tmp_path / "x.safetensors")
    assert ck.detect_format(tmp_path / "x.npz") == "safetensors"
    assert ck.detect_format(tmp_path / "x.safetensors") == "npz"
    assert_same(ck.load(tmp_path / "x.npz"), sd)
    assert_same(ck.load(tmp_path / "x.safetensors"), sd)
    ck.save(sd, tmp_path / "model.pt")  # unknown suffix -> safetensors
    assert ck.detect_format(tmp_path / "model.pt") == "safetensors"


def test_unrecognised_content(tmp_path):
    for content in (b"", b"hello world", b"\x00" * 64, b"PK\x03\x04garbage"):
        (tmp_path / "x.bin").write_bytes(content)
        with pytest.raises(ck.CheckpointError, match="x.bin"):
            ck.detect_format(tmp_path / "x.bin")
        with pytest.raises(ck.CheckpointError, match="x.bin"):
            ck.load(tmp_path / "x.bin")


# -- interrupted saves ------------------------------------------------------------

def _half_then_fail(exc):
    def writer(f, arrays, metadata):
        f.write(b"partial data " * 100)
        raise exc
    return writer


@pytest.mark.parametrize("suffix,module", [(".safetensors", safetensors_format),
                                           ("", safetensors_format),
                                           (".npz", npz_format)])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch, suffix, module, exc):
    path = tmp_path / f"ckpt{suffix}"
    old = {"a": sample(np.float32), "b": sample(np.int64, (2,))}
    ck.save(old, path)
    before = path.read_bytes()
    monkeypatch.setattr(module, "_write", _half_then_fail(exc))
    with pytest.raises(type(exc)):
        ck.save({"a": np.zeros(3)}, path)
    assert path.read_bytes() == before
    assert_same(ck.load(path), old)
    assert os.listdir(tmp_path) == [path.name]


def test_failing_fsync_or_rename_keeps_old_file(tmp_path, monkeypatch):
    from lorac.checkpoint import atomic
    path = tmp_path / "ckpt.safetensors"
    ck.save({"a": np.ones(2)}, path)
    before = path.read_bytes()
    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            def boom(*args, **kwargs):
                raise OSError(f"{name} failed")
            m.setattr(atomic.os, name, boom)
            with pytest.raises(OSError, match=name):
                ck.save({"a": np.zeros(5)}, path)
        assert path.read_bytes() == before
        assert os.listdir(tmp_path) == [path.name]


def test_save_to_missing_folder_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.save({"a": np.ones(1)}, tmp_path / "no" / "x.safetensors")


@pytest.mark.parametrize("suffix", ["", ".npz"])
def test_save_to_a_folder_says_so_before_writing(tmp_path, suffix):
    folder = tmp_path / f"adapter{suffix}"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="it is a folder; give a file name"):
        ck.save({"a": np.ones(1)}, folder)
    assert os.listdir(tmp_path) == [folder.name] and os.listdir(folder) == []


# -- torch files, read without torch -------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _torch_save(obj, path, **kwargs):
    torch = _torch()
    torch.save(obj, path, **kwargs)
    return path


def _expected(t):
    """What lorac should give for a torch tensor: half types become float32."""
    torch = _torch()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.detach().contiguous().numpy()


def assert_matches_torch(loaded, tensors):
    assert sorted(loaded) == sorted(tensors)
    for key, t in tensors.items():
        want = _expected(t)
        assert loaded[key].dtype == want.dtype, key
        assert loaded[key].shape == want.shape, key
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)


@pytest.mark.torch
def test_torch_loralib_state_dicts(tmp_path):
    torch = _torch()
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        loralib.Linear(6, 5, r=2, lora_alpha=4),
        torch.nn.ReLU(),
        loralib.MergedLinear(5, 9, r=2, enable_lora=[True, False, True]),
        loralib.Embedding(10, 4, r=3),
    )
    for p in model.parameters():  # make lora_B non-zero so the test means something
        torch.nn.init.normal_(p)
    for name, sd in [("lora", loralib.lora_state_dict(model)), ("full", model.state_dict())]:
        path = _torch_save(sd, tmp_path / f"{name}.pt")
        assert ck.detect_format(path) == "torch_zip"
        assert_matches_torch(ck.load(path), sd)


@pytest.mark.torch
@pytest.mark.parametrize("protocol", [2, 4])  # 2 is torch's default; 4 uses STACK_GLOBAL
def test_torch_dtypes(tmp_path, protocol):
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    tensors = {
        "f16": x.half(), "bf16": x.bfloat16(), "f32": x, "f64": x.double(),
        "i64": (x * 100).long(), "i32": (x * 100).int(), "i16": (x * 100).short(),
        "i8": (x * 10).char(), "u8": (x.abs() * 10).byte(), "bool": x > 0,
        # uint16/32/64 are written with _rebuild_tensor_v3 and an UntypedStorage
        "u16": (x.abs() * 100).int().to(torch.uint16),
        "u32": (x.abs() * 1e5).long().to(torch.uint32).t(),
        "u64": (x.abs() * 1e5).long().to(torch.uint64)[1:],
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(x.clone()),
    }
    path = _torch_save(tensors, tmp_path / "dtypes.pth", pickle_protocol=protocol)
    assert_matches_torch(ck.load(path), tensors)


@pytest.mark.torch
def test_torch_views_and_shared_storages(tmp_path):
    torch = _torch()
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "base": base, "t": base.t(), "slice": base[1:, ::2], "col": base[:, 3],
        "offset": base.view(-1)[7:19].view(3, 4), "expand": base[0, :3].expand(4, 3),
        "permute": base.reshape(2, 3, 10).permute(2, 0, 1), "row": base[4],
        "half_view": base.half()[::2, 1::3], "bf16_t": base.bfloat16().t(),
    }
    path = _torch_save(tensors, tmp_path / "views.bin")
    loaded = ck.load(path)
    assert_matches_torch(loaded, tensors)
    loaded["t"][0, 0] = -1  # results are independent copies
    assert loaded["base"][0, 0] == 0


@pytest.mark.torch
def test_torch_wrapped_state_dicts(tmp_path):
    torch = _torch()
    sd = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    for wrapper in ("state_dict", "model"):
        path = _torch_save({wrapper: sd}, tmp_path / f"{wrapper}.pt")
        assert_matches_torch(ck.load(path), sd)
    path = _torch_save({"model": sd, "epoch": 3}, tmp_path / "train.pt")
    with pytest.raises(ck.CheckpointError, match="'model' has type dict, not a tensor"):
        ck.load(path)
    path = _torch_save({"w": torch.ones(2), "step": 7}, tmp_path / "mixed.pt")
    with pytest.raises(ck.CheckpointError, match="'step' has type int"):
        ck.load(path)
    path = _torch_save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ck.CheckpointError, match="holds an object of type list"):
        ck.load(path)


@pytest.mark.torch
def test_torch_unsupported_dtypes_are_refused(tmp_path):
    torch = _torch()
    for name, t in [("complex", torch.ones(2, dtype=torch.complex64)),
                    ("float8", torch.zeros(2).to(torch.float8_e4m3fn))]:
        path = _torch_save({"x": t}, tmp_path / f"{name}.pt")
        with pytest.raises(ck.CheckpointError, match="refused global"):
            ck.load(path)


@pytest.mark.torch
def test_torch_legacy_format_is_refused(tmp_path):
    path = _torch_save({"w": _torch().ones(2)}, tmp_path / "old.pt",
                       _use_new_zipfile_serialization=False)
    assert ck.detect_format(path) == "torch_legacy"
    with pytest.raises(ck.CheckpointError, match="_use_new_zipfile_serialization=True"):
        ck.load(path)


@pytest.mark.torch
def test_torch_safetensors_interop(tmp_path):
    """Files written by safetensors.torch (e.g. PEFT adapters), bf16 included."""
    torch = _torch()
    st_torch = pytest.importorskip("safetensors.torch")
    x = torch.randn(4, 3)
    tensors = {"a": x, "h": x.half(), "bf": x.bfloat16(), "i": x.long()}
    st_torch.save_file(tensors, tmp_path / "peft.safetensors", metadata={"format": "pt"})
    assert_matches_torch(ck.load(tmp_path / "peft.safetensors"), tensors)
    assert ck.read_metadata(tmp_path / "peft.safetensors") == {"format": "pt"}
    # and torch reads what lorac writes
    ck.save({"a": x.numpy()}, tmp_path / "lorac.safetensors")
    assert torch.equal(st_torch.load_file(tmp_path / "lorac.safetensors")["a"], x)
