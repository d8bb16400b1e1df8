"""lorac.checkpoint against hostile, corrupt and truncated files.

Torch-style files are built by hand here (a zip laid out like torch.save's,
with a pickle written opcode by opcode), so most of this runs without torch.
"""

import io
import os
import pickle
import struct
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorac import checkpoint as ck
from lorac.checkpoint import safetensors_format, torch_format

# -- hand-made torch files ----------------------------------------------------------


def frag(obj):
    """The pickle opcodes that push ``obj`` (protocol 2, no PROTO/STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_ops(key="0", numel=6, offset=0, size=(2, 3), stride=(3, 1),
               storage="FloatStorage", rebuild="_rebuild_tensor_v2", storage_module="torch"):
    """Opcodes for ``_rebuild_tensor_v2(<persistent storage>, offset, size, stride, ...)``."""
    pid = (b"(" + frag("storage") + glob(storage_module, storage) + frag(key) + frag("cpu")
           + frag(numel) + b"tQ")
    return (glob("torch._utils", rebuild) + b"(" + pid + frag(offset) + frag(size)
            + frag(stride) + b"\x89" + glob("collections", "OrderedDict") + b")RtR")


def dict_pickle(entries):
    """A protocol-2 pickle of a dict whose values are the given opcode strings."""
    return b"\x80\x02}(" + b"".join(frag(k) + v for k, v in entries.items()) + b"u."


def torch_zip(path, pkl, records=None, byteorder=b"little", prefix="archive",
              compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in (records or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", b"3\n")
    return path


BASE = np.arange(6, dtype="<f4")
HANDMADE_EXPECTED = {
    "w": BASE.reshape(2, 3),
    "wt": BASE.reshape(2, 3).T,
    "tail": BASE[2:5],
    "ids": np.array([3, -1, 7], dtype=np.int64),
}


def handmade_torch_file(path):
    pkl = dict_pickle({
        "w": tensor_ops(),
        "wt": tensor_ops(size=(3, 2), stride=(1, 3)),
        "tail": tensor_ops(offset=2, size=(3,), stride=(1,)),
        "ids": tensor_ops(key="1", numel=3, size=(3,), stride=(1,), storage="LongStorage"),
    })
    return torch_zip(path, pkl, {"0": BASE.tobytes(), "1": HANDMADE_EXPECTED["ids"].tobytes()})


def assert_same(loaded, expected):
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def refused(path, match):
    """load(path) raises CheckpointError naming the file and matching ``match``."""
    with pytest.raises(ck.CheckpointError, match=match) as info:
        ck.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    return info.value


def test_handmade_torch_file_loads(tmp_path):
    path = handmade_torch_file(tmp_path / "ok.pt")
    assert ck.detect_format(path) == "torch_zip"
    assert_same(ck.load(path), HANDMADE_EXPECTED)


def test_byteorder_record_is_honoured(tmp_path):
    pkl = dict_pickle({"w": tensor_ops(), "h": tensor_ops(key="1", numel=2, size=(2,),
                                                           stride=(1,), storage="BFloat16Storage")})
    bf16 = (np.array([1.5, -2.0], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    path = torch_zip(tmp_path / "big.pt", pkl,
                     {"0": BASE.astype(">f4").tobytes(), "1": bf16.astype(">u2").tobytes()},
                     byteorder=b"big")
    out = ck.load(path)
    np.testing.assert_array_equal(out["w"], BASE.reshape(2, 3))
    np.testing.assert_array_equal(out["h"], [1.5, -2.0])
    assert out["w"].dtype.isnative and out["h"].dtype == np.float32


# -- code execution attempts ------------------------------------------------------------


class Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_payloads(marker):
    """(pickle bytes, name of the global it needs) pairs, each of which would run code."""
    cmd = f"touch {marker}"
    code = f"__import__('os').system({cmd!r})"
    return [
        (pickle.dumps(Evil(os.system, cmd), protocol=2), f"{os.system.__module__}.system"),
        (b"\x80\x02" + glob("os", "system") + b"(" + frag(cmd) + b"tR.", "os.system"),
        (b"\x80\x02" + glob("builtins", "eval") + b"(" + frag(code) + b"tR.", "builtins.eval"),
        (b"\x80\x02" + glob("subprocess", "Popen") + b"(" + frag(["touch", str(marker)])
         + b"tR.", "subprocess.Popen"),
        # protocol 4 uses STACK_GLOBAL, which the opcode scan cannot resolve statically
        (pickle.dumps(Evil(eval, code), protocol=4), "builtins.eval"),
        (pickle.dumps({"w": Evil(os.system, cmd)}, protocol=4), f"{os.system.__module__}.system"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_torch_zip_code_execution_is_refused(tmp_path, index):
    marker = tmp_path / "pwned"
    pkl, name = evil_payloads(marker)[index]
    path = torch_zip(tmp_path / "evil.pt", pkl)
    refused(path, f"refused global '{name}'")
    assert not marker.exists()


@pytest.mark.parametrize("index", range(6))
def test_bare_pickle_is_never_unpickled(tmp_path, index):
    marker = tmp_path / "pwned"
    pkl, _ = evil_payloads(marker)[index]
    (tmp_path / "evil.pt").write_bytes(pkl)
    assert ck.detect_format(tmp_path / "evil.pt") == "torch_legacy"
    refused(tmp_path / "evil.pt", "legacy")
    assert not marker.exists()


def test_evil_global_after_valid_tensors_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # STACK_GLOBAL (0x93) names its global from the stack: only find_class sees it
    evil = frag("posix") + frag("system") + b"\x93(" + frag(f"touch {marker}") + b"tR"
    pkl = dict_pickle({"w": tensor_ops(), "x": evil})
    path = torch_zip(tmp_path / "evil.pt", pkl, {"0": BASE.tobytes()})
    refused(path, "refused global")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("torch", "load"), ("torch._utils", "_rebuild_from_type_v2"), ("numpy", "frombuffer"),
    ("copyreg", "_reconstructor"), ("collections", "defaultdict"), ("torch", "Tensor"),
    ("torch", "float32"), ("torch", "ComplexFloatStorage"), ("torch._utils", "os"),
])
def test_other_globals_are_refused(tmp_path, module, name):
    pkl = b"\x80\x02" + glob(module, name) + b")R."
    refused(torch_zip(tmp_path / "g.pt", pkl), f"refused global '{module}.{name}'")


def test_evil_global_as_storage_type(tmp_path):
    pkl = dict_pickle({"w": tensor_ops(storage_module="os", storage="system")})
    refused(torch_zip(tmp_path / "s.pt", pkl, {"0": BASE.tobytes()}), "refused global 'os.system'")


@pytest.mark.parametrize("target", [("torch", "FloatStorage"), ("torch", "uint16"),
                                    ("collections", "OrderedDict"),
                                    ("torch._utils", "_rebuild_tensor_v2")])
def test_stand_ins_cannot_be_modified(tmp_path, target):
    # BUILD with slot state would setattr() on the stand-in; with a dict it
    # would update its __dict__.  Either must fail, and later loads be unharmed.
    for state in ((None, {"name": "LongStorage", "element": None, "func": None}),
                  {"name": "LongStorage"}):
        pkl = b"\x80\x02" + glob(*target) + frag(state) + b"b0}."
        refused(torch_zip(tmp_path / "m.pt", pkl), "invalid torch checkpoint")
    assert_same(ck.load(handmade_torch_file(tmp_path / "ok.pt")), HANDMADE_EXPECTED)


def test_loading_never_imports_torch(tmp_path, child_env):
    import subprocess
    import sys
    path = handmade_torch_file(tmp_path / "ok.pt")
    code = ("import sys, lorac.checkpoint as c; c.load(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=child_env, cwd=tmp_path)


def test_npz_object_array_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.array([Evil(os.system, f"touch {marker}")], dtype=object)
    np.savez(tmp_path / "evil.npz", w=np.ones(2), x=payload)  # numpy pickles it
    refused(tmp_path / "evil.npz", "object array")
    assert not marker.exists()


# -- malformed torch files --------------------------------------------------------------

RECORDS = {"0": BASE.tobytes()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(offset=1), "reads element 6"),
    (dict(size=(3, 3)), "reads element"),
    (dict(size=(2, 3), stride=(4, 1)), "reads element"),
    (dict(size=(7,), stride=(1,)), "reads element"),
    (dict(stride=(-3, 1)), "non-negative"),
    (dict(offset=-1), "non-negative"),
    (dict(size=(2.0, 3)), "non-negative ints"),
    (dict(size=(2, 3), stride=(1,)), "equal length"),
    (dict(size=[2, 3]), "tuples"),
    (dict(size=(1,) * 65, stride=(1,) * 65), "<= 64"),
    (dict(size=(2 ** 31, 2 ** 31), stride=(0, 0)), "expand to more than"),
    (dict(numel=7), "declares 7 x 4 bytes but its record holds 24"),
    (dict(numel=2 ** 62), "declares"),
    (dict(numel=-1), "malformed storage reference"),
    (dict(key="9"), "missing record 'archive/data/9'"),
    (dict(storage="ComplexFloatStorage"), "refused global"),
    (dict(rebuild="_rebuild_tensor_v3"), "TypeError"),
])
def test_bad_tensor_geometry(tmp_path, kwargs, match):
    path = torch_zip(tmp_path / "bad.pt", dict_pickle({"w": tensor_ops(**kwargs)}), RECORDS)
    refused(path, match)


def test_storage_reused_with_another_type(tmp_path):
    pkl = dict_pickle({"a": tensor_ops(), "b": tensor_ops(storage="IntStorage")})
    refused(torch_zip(tmp_path / "t.pt", pkl, RECORDS), "two types or sizes")


def test_untyped_storage_with_dtype(tmp_path):
    def v3(numel, dtype):
        pid = (b"(" + frag("storage") + glob("torch.storage", "UntypedStorage") + frag("0")
               + frag("cpu") + frag(numel) + b"tQ")
        return (glob("torch._utils", "_rebuild_tensor_v3") + b"(" + pid + frag(0) + frag((3,))
                + frag((1,)) + b"\x89" + glob("collections", "OrderedDict") + b")R"
                + glob("torch", dtype) + b"tR")
    ok = torch_zip(tmp_path / "ok.pt", dict_pickle({"u": v3(6, "uint16")}),
                   {"0": np.array([1, 2, 65535], "<u2").tobytes()})
    np.testing.assert_array_equal(ck.load(ok)["u"], np.array([1, 2, 65535], np.uint16))
    odd = torch_zip(tmp_path / "odd.pt", dict_pickle({"u": v3(5, "uint32")}), {"0": b"\0" * 5})
    refused(odd, "whole number")
    bad = torch_zip(tmp_path / "bad.pt", dict_pickle({"u": v3(6, "float8_e4m3fn")}),
                    {"0": b"\0" * 6})
    refused(bad, "refused global 'torch.float8_e4m3fn'")


def test_expansion_budget_counts_all_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_format, "EXTRA_OUTPUT_BYTES", 1 << 16)
    data = np.zeros(4096, "<f4").tobytes()  # 16 KiB storage, file ~16 KiB
    entries = {f"v{i}": tensor_ops(numel=4096, size=(4096,), stride=(1,)) for i in range(6)}
    path = torch_zip(tmp_path / "many.pt", dict_pickle(entries), {"0": data})
    assert len(ck.load(path)) == 6
    entries = {f"v{i}": tensor_ops(numel=4096, size=(4096,), stride=(1,)) for i in range(12)}
    refused(torch_zip(tmp_path / "many.pt", dict_pickle(entries), {"0": data}), "expand")


def test_bad_archives(tmp_path):
    pkl = dict_pickle({"w": tensor_ops()})
    refused(torch_zip(tmp_path / "c.pt", pkl, RECORDS, compression=zipfile.ZIP_DEFLATED),
            "compressed")
    refused(torch_zip(tmp_path / "b.pt", pkl, RECORDS, byteorder=b"middle"), "byteorder")
    two = torch_zip(tmp_path / "two.pt", pkl, RECORDS)
    with zipfile.ZipFile(two, "a") as z:
        z.writestr("other/data.pkl", pkl)
    refused(two, "one data.pkl")
    with zipfile.ZipFile(tmp_path / "neither.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    refused(tmp_path / "neither.zip", "neither")


@pytest.mark.parametrize("pkl,match", [
    (b"\x80\x02\x8e" + struct.pack("<Q", 2 ** 60) + b"abc.", "invalid torch"),
    (b"\x80\x02X" + struct.pack("<I", 2 ** 31) + b"abc.", "invalid torch"),
    (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", "holds an object of type list"),
    (b"\x80\x02K\x01.", "holds an object of type int"),
    (b"\x80\x02}.", None),
    (b"\x80\x02", "invalid torch"),
    (b"garbage", "invalid torch"),
    (b"\x80\x02" + glob("torch", "FloatStorage") + b")R.", "TypeError"),
    (b"\x80\x02}(K\x01" + tensor_ops() + b"u.", "not a str"),
])
def test_bad_pickles(tmp_path, pkl, match):
    path = torch_zip(tmp_path / "p.pt", pkl, RECORDS)
    if match is None:
        assert ck.load(path) == {}
    else:
        refused(path, match)


def test_pickle_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_format, "MAX_PICKLE_BYTES", 100)
    pkl = dict_pickle({"w": tensor_ops(), "v": tensor_ops()})
    refused(torch_zip(tmp_path / "p.pt", pkl, RECORDS), "larger than the limit")


def _patch_central_sizes(path, member, size):
    """Make the central directory claim ``size`` bytes for ``member``."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack_from("<H", data, entry + 28)[0]
        if data[entry + 46: entry + 46 + name_len] == member.encode():
            break
        entry = data.index(b"PK\x01\x02", entry + 4)
    struct.pack_into("<II", data, entry + 20, size, size)
    path.write_bytes(bytes(data))


def test_huge_declared_record_sizes(tmp_path):
    for member in ("archive/data.pkl", "archive/data/0"):
        path = handmade_torch_file(tmp_path / "h.pt")
        _patch_central_sizes(path, member, 0x7FFF0000)
        refused(path, "past the end of the file|larger than the limit")


# -- malformed safetensors ----------------------------------------------------------------


def st_bytes(header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("content,match", [
    (st_bytes({"a": F32_4}, b"\0" * 8), "not fully covered"),            # offsets past end
    (st_bytes({"a": {**F32_4, "data_offsets": [0, 2 ** 62]}}, b"\0" * 16), "safetensors"),
    (st_bytes({"a": {**F32_4, "shape": [2 ** 40, 2 ** 40]}}, b"\0" * 16), "overflow"),
    (st_bytes({"a": {**F32_4, "shape": [5]}}, b"\0" * 16), "safetensors"),
    (st_bytes({"a": F32_4, "b": F32_4}, b"\0" * 16), "offset"),         # overlap
    (st_bytes({"a": {**F32_4, "data_offsets": [4, 20]}}, b"\0" * 20), "offset"),  # gap
    (st_bytes({"a": {**F32_4, "dtype": "F8_E4M3", "shape": [16]}}, b"\0" * 16), "unsupported"),
    (st_bytes({"a": {**F32_4, "dtype": "C64", "shape": [2]}}, b"\0" * 16), "unsupported"),
    (st_bytes({"a": {**F32_4, "dtype": "X"}}, b"\0" * 16), "safetensors"),
    (st_bytes({"__metadata__": {"r": 8}}), "safetensors"),
    (st_bytes(b'{"a": '), "safetensors"),
    (st_bytes(b'{"\xff": 1}'), "safetensors"),
    (st_bytes({"a": F32_4}, b"\0" * 16, length=2 ** 64 - 1), "unrecognised"),
    (st_bytes({"a": F32_4}, b"\0" * 16, length=10 ** 6), "unrecognised"),
    (st_bytes({"a": F32_4}, b"\0" * 16, length=1), "safetensors"),
])
def test_bad_safetensors(tmp_path, content, match):
    (tmp_path / "x.safetensors").write_bytes(content)
    refused(tmp_path / "x.safetensors", match)


def test_safetensors_header_length_checked_before_reading(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_bytes({"a": F32_4}, b"\0" * 16, length=2 ** 40))
    with open(path, "rb") as fh, pytest.raises(ck.CheckpointError, match="header length"):
        safetensors_format.load(fh, path)
    with open(path, "rb") as fh, pytest.raises(ck.CheckpointError, match="header length"):
        safetensors_format.read_metadata(fh, path)


def test_safetensors_bool_bytes_are_normalised(tmp_path):
    path = tmp_path / "b.safetensors"
    path.write_bytes(st_bytes({"b": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}},
                              b"\x00\x01\x07"))
    out = ck.load(path)["b"]
    assert out.tolist() == [False, True, True] and out.view(np.uint8).max() == 1


# -- malformed npz ------------------------------------------------------------------------


def npy_bytes(descr, shape, data, fortran=False):
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return f.getvalue() + data


def npz_of(path, members, compression=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(path, "w", compression) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


@pytest.mark.parametrize("members,match", [
    ([("a.npy", npy_bytes("<f4", (2 ** 40,), b"\0" * 16))], "needs"),
    ([("a.npy", npy_bytes("<f4", (2 ** 62, 2 ** 62), b"\0" * 16))], "needs"),
    ([("a.npy", npy_bytes("<f4", (5,), b"\0" * 16))], "needs"),
    ([("a.npy", npy_bytes("<c8", (2,), b"\0" * 16))], "unsupported dtype"),
    ([("a.npy", npy_bytes("<U2", (2,), b"\0" * 16))], "unsupported dtype"),
    ([("a.npy", npy_bytes([("x", "<f4")], (2,), b"\0" * 8))], "unsupported dtype"),
    ([("a.npy", npy_bytes("|O", (2,), b"\0" * 16))], "object array"),
    ([("a.npy", b"\x93NUMPY\x09\x00" + b"\0" * 20)], "unsupported .npy version"),
    ([("a.npy", b"not an npy file at all")], "invalid .npz"),
    ([("a.npy", npy_bytes("<f4", (4,), b"\0" * 16))] * 2, "appears twice"),
])
def test_bad_npz(tmp_path, members, match):
    refused(npz_of(tmp_path / "x.npz", members), match)


def test_npz_deflate_bomb_claims_are_refused(tmp_path):
    path = npz_of(tmp_path / "z.npz", [("a.npy", npy_bytes("<f4", (4,), b"\0" * 16))],
                  compression=zipfile.ZIP_DEFLATED)
    _patch_central_sizes_npz(path, 2 ** 31 - 1)
    refused(path, "declares sizes")


def _patch_central_sizes_npz(path, uncompressed):
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, entry + 24, uncompressed)
    path.write_bytes(bytes(data))


# -- truncation and corruption of valid files ----------------------------------------------


def valid_files(folder):
    """{format: (bytes, loaded content)} for small valid files of each format."""
    sd = {"lora_A": np.arange(12, dtype=np.float32).reshape(3, 4),
          "lora_B": np.ones((4, 3), np.float64), "n": np.array(5, dtype=np.int64),
          "mask": np.array([True, False, True])}
    out = {}
    for fmt, name in (("safetensors", "a.safetensors"), ("npz", "a.npz")):
        ck.save(sd, folder / name, metadata={"r": "2"} if fmt == "safetensors" else None)
        out[fmt] = ((folder / name).read_bytes(), sd)
    out["torch_zip"] = (handmade_torch_file(folder / "a.pt").read_bytes(), HANDMADE_EXPECTED)
    return out


def check_load(path, expected, strict):
    """load() gives CheckpointError or a well-formed dict (equal to expected if strict)."""
    try:
        loaded = ck.load(path)
    except ck.CheckpointError as exc:
        assert str(path) in str(exc)
        return False
    assert isinstance(loaded, dict)
    for key, value in loaded.items():
        assert isinstance(key, str) and isinstance(value, np.ndarray)
        assert value.dtype in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                               np.uint16, np.uint32, np.uint64, np.float32, np.float64)
        assert value.flags.c_contiguous and value.flags.writeable
    if strict:
        assert_same(loaded, expected)
    return True


# A zip checks a CRC-32 over every member and the names twice (local and central
# header), so a corrupted zip either fails or loads the original content.
# safetensors has no checksum: corrupted tensor bytes load as other values.
STRICT = {"safetensors": False, "npz": True, "torch_zip": True}


def positions(n):
    """Every offset in the first 64 and last 160 bytes (headers, zip directory),
    every third one in between: enough coverage at a bounded cost."""
    return sorted(set(range(min(n, 64))) | set(range(max(0, n - 160), n)) | set(range(0, n, 3)))


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "torch_zip"])
def test_truncations_are_refused(tmp_path, fmt):
    content, _ = valid_files(tmp_path)[fmt]
    path = tmp_path / "cut"
    for n in positions(len(content)):
        path.write_bytes(content[:n])
        refused(path, None)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "torch_zip"])
def test_byte_corruptions(tmp_path, fmt):
    content, expected = valid_files(tmp_path)[fmt]
    path = tmp_path / "flip"
    for i in positions(len(content)):
        mutated = bytearray(content)
        mutated[i] ^= 0x5A
        path.write_bytes(bytes(mutated))
        check_load(path, expected, STRICT[fmt])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    files = valid_files(folder)
    try:
        import torch
    except ImportError:
        return folder, files
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"w": t, "wt": t.t(), "h": t[1:, ::2].half(), "i": t.long()[0], "b": t > 5}
    torch.save(sd, folder / "real.pt")
    files["torch_real"] = ((folder / "real.pt").read_bytes(),
                           {k: (v.float() if v.dtype == torch.float16 else v).contiguous().numpy()
                            for k, v in sd.items()})
    STRICT["torch_real"] = True
    return folder, files


def mutate(content, ops):
    data = bytearray(content)
    for kind, where, value in ops:
        pos = where % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << (value % 8)
        elif kind == "set" and pos < len(data):
            data[pos] = value
        elif kind == "insert":
            data[pos:pos] = bytes([value])
        elif kind == "delete":
            del data[pos:pos + 1 + value % 16]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "flip", "set", "insert", "delete", "truncate"]),
              st.integers(0, 2 ** 16), st.integers(0, 255)),
    min_size=1, max_size=3)

FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "torch_zip",
                                 pytest.param("torch_real", marks=pytest.mark.torch)])
def test_random_mutations(originals, fmt):
    folder, files = originals
    if fmt not in files:
        pytest.skip("needs torch")
    content, expected = files[fmt]
    path = folder / f"fuzz_{fmt}"

    @FUZZ
    @given(MUTATIONS)
    def run(ops):
        path.write_bytes(mutate(content, ops))
        check_load(path, expected, STRICT[fmt])

    run()
