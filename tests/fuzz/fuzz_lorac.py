"""Fuzz harness for lorac's C binding and file loaders (issue 7).

    python tests/fuzz/fuzz_lorac.py --seconds 60            # atheris if installed, else random
    python tests/fuzz/fuzz_lorac.py --seconds 600 --engine random
    python tests/fuzz/fuzz_lorac.py --seconds 3600 -- -jobs=2 corpus_dir   # extra libFuzzer flags

Each input (bytes) is read as a sequence of decisions (``Reader``) that pick
one target and build its arguments:

* ``binding``: a function of lorac._C -- every public one, from the catalogue
  in tests/entry_points.py -- called with a VALID argument set in which some
  arguments are replaced by hostile values (None, huge ints, NaN, strings,
  nested lists, arrays of every dtype, ndim, layout and writability, zero-
  stride views claiming 2**31+ elements, unaligned and byte-swapped arrays,
  objects whose __float__ / __index__ / __bool__ / __len__ raise or mutate
  the argument lists), or with a wholly random argument tuple;
* ``checkpoint``: ``lorac.checkpoint.load`` of a file holding raw bytes or a
  mutated valid safetensors / .npz / torch-zip file;
* ``peft``: ``lorac.load_peft_adapter`` on a folder with a mutated or random
  adapter_config.json and adapter_model.safetensors; a failed load must
  leave the model exactly as it was.

Passing means: no crash, no hang, and only documented exceptions
(``ALLOWED``).  Anything else propagates -- atheris reports it and exits
non-zero, as does a segfault.  The process limits its address space to
4 GiB, so a runaway allocation is a MemoryError, not a machine in trouble.
Exit status 0 means the time budget ran out without a finding.
"""

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: entry_points

import entry_points as E  # noqa: E402


class FuzzSentinel(Exception):
    """Raised by the harness's own hostile objects: expected to propagate."""


# --------------------------------------------------------------------------
# decisions from bytes
# --------------------------------------------------------------------------

class Reader:
    """Reads fuzzer bytes as decisions (the Draw interface of entry_points).
    Past the end of the data every draw returns its lowest value."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def _take(self, n):
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "little")

    def int(self, lo, hi):
        span = hi - lo + 1
        if span <= 1:
            return lo
        return lo + self._take((span.bit_length() + 7) // 8) % span

    def float(self, lo, hi):
        return lo + (hi - lo) * self._take(2) / 65535.0

    def bool(self):
        return bool(self._take(1) & 1)

    def choice(self, options):
        return options[self.int(0, len(options) - 1)]

    def bytes(self, n):
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


# --------------------------------------------------------------------------
# hostile values
# --------------------------------------------------------------------------

DTYPES = ("f4", "f8", ">f4", ">f8", "f2", "i1", "u1", "i4", "i8", "u8", "?", "c8", "c16", "O", "U3",
          "V8", "M8[s]", [("a", "f4")])
HUGE = 2**31  # one past BLAS's 32-bit integers


class Hostile:
    """An object whose numeric / sequence protocols raise FuzzSentinel."""

    def __float__(self):
        raise FuzzSentinel("__float__")

    def __index__(self):
        raise FuzzSentinel("__index__")

    def __bool__(self):
        raise FuzzSentinel("__bool__")

    def __len__(self):
        raise FuzzSentinel("__len__")

    def __iter__(self):
        raise FuzzSentinel("__iter__")

    def __getitem__(self, i):
        raise FuzzSentinel("__getitem__")


class ClearingInt(int):
    """An int whose __float__ empties the lists it was given (a mutation
    during argument parsing)."""

    victims = []

    def __float__(self):
        for v in ClearingInt.victims:
            v.clear()
        return 1.0


def random_array(r):
    dtype = np.dtype(r.choice(DTYPES))
    ndim = r.int(0, 3)
    shape = tuple(r.int(0, 5) for _ in range(ndim))
    kind = r.int(0, 9)
    if kind == 0 and ndim:  # zero strides claiming a huge dimension: no memory behind it
        big = list(shape)
        big[r.int(0, ndim - 1)] = r.choice([HUGE, HUGE + 1, 2**33, 2**40])
        return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(big), strides=(0,) * ndim)
    if kind == 1 and dtype.itemsize > 1 and dtype.kind in "fiu":  # unaligned
        raw = np.zeros(int(np.prod(shape)) * dtype.itemsize + 1, np.uint8)
        return raw[1:].view(dtype).reshape(shape)
    if dtype.kind == "f":
        a = np.random.default_rng(r.int(0, 255)).uniform(-2, 2, shape).astype(dtype)
        special = r.int(0, 5)
        if special and a.size:
            a.flat[r.int(0, a.size - 1)] = (np.nan, np.inf, -np.inf, 1e38, 0.0)[special - 1]
    elif dtype.kind in "iu":
        a = np.random.default_rng(r.int(0, 255)).integers(-3, 8, shape).astype(dtype)
        if a.size and r.bool():
            a.flat[r.int(0, a.size - 1)] = np.iinfo(dtype).max
    elif dtype.kind == "O":
        a = np.empty(shape, dtype)
        a.fill(r.choice([None, 1.5, "x"]))
    else:
        a = np.zeros(shape, dtype)
    a = E.relayout(a, r.choice(E.LAYOUTS), r)
    if r.int(0, 7) == 0:
        a.flags.writeable = False
    return a


def random_object(r, depth=0):
    k = r.int(0, 19)
    if k == 0:
        return None
    if k == 1:
        return r.choice([True, False])
    if k == 2:
        return r.choice([0, 1, -1, 2**31 - 1, 2**31, -2**31 - 1, 2**63, -2**63 - 1, 10**100, r.int(-9, 99)])
    if k == 3:
        return r.choice([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e308, 5e-324, r.float(-5, 5)])
    if k == 4:
        return r.choice(["", "relu", "gelu", "gelu_tanh", "tanh", "\x00", "é" * 3, "x" * 200])
    if k == 5:
        return r.bytes(r.int(0, 8))
    if k in (6, 7) and depth < 2:
        items = [random_object(r, depth + 1) for _ in range(r.int(0, 4))]
        return items if k == 6 else tuple(items)
    if k == 8 and depth < 2:
        return {r.choice(["k", 0, None, (1, 2)]): random_object(r, depth + 1) for _ in range(r.int(0, 2))}
    if k == 9:
        return r.choice([np.float32(1.5), np.float64("nan"), np.int64(-1), np.bool_(True), np.uint64(2**63)])
    if k == 10:
        return Hostile()
    if k == 11:
        return object()
    if k == 12:
        return [np.ones((2, 3)), Hostile()]
    if k == 13:
        return [r.bool() for _ in range(r.int(0, 4))]
    return random_array(r)


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------

ALLOWED = (TypeError, ValueError, IndexError, KeyError, MemoryError, OverflowError, FuzzSentinel)


def note(exc, what):
    """Allowed exceptions pass silently, except MemoryError: printed, since
    each one is an allocation the process could not make (a size check missing?)."""
    if isinstance(exc, MemoryError):
        print(f"fuzz_lorac: MemoryError in {what}: {exc}", file=sys.stderr, flush=True)


def fuzz_binding(r, C):
    names = E.public_functions(C)
    name = r.choice(names)
    fn = getattr(C, name)
    if name in E.UTILITIES:
        args = E.UTILITIES[name](C)
        if name == "set_num_threads":  # must not leave a strange thread count behind
            args = (r.choice([1, C.get_num_threads(), 0, -1, 4097, 2**70, 1.5, None, "2"]),)
        try:
            fn(*args) if r.bool() else fn(*[random_object(r) for _ in range(r.int(0, 3))])
        except ALLOWED as exc:
            note(exc, name)
        finally:
            C.set_num_threads(max(1, C.get_num_threads()))
        return
    if r.int(0, 9) == 0:  # a wholly random call
        args = [random_object(r) for _ in range(r.int(0, 12))]
        kwargs = {r.choice(["x", "weight", "scaling", "\x00", ""]): random_object(r) for _ in range(r.int(0, 1))}
        try:
            fn(*args, **kwargs)
        except ALLOWED as exc:
            note(exc, name)
        return
    kwargs = dict(E.BY_NAME[name].build(r).kwargs)
    for _ in range(r.int(0, 3)):
        if not kwargs:
            break
        arg = r.choice(sorted(kwargs))
        how = r.int(0, 5)
        if how == 0:
            del kwargs[arg]
        elif how == 1 and isinstance(kwargs[arg], list):  # mutate the adapter lists while parsing
            victim = kwargs[arg]
            ClearingInt.victims = [v for v in kwargs.values() if isinstance(v, list)]
            if victim:
                victim[0] = ClearingInt(1) if arg == "scalings" else Hostile()
        else:
            kwargs[arg] = random_object(r)
    if r.int(0, 19) == 0:
        kwargs["no_such_argument"] = 1
    try:
        fn(**kwargs)
    except ALLOWED as exc:
        note(exc, f"{name}({', '.join(sorted(kwargs))})")
    finally:
        ClearingInt.victims = []


def _seed_files(folder):
    """Valid checkpoint files to mutate: safetensors, npz and (if torch is
    importable) a torch.save zip."""
    import lorac
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2.0]),
          "i": np.array([3, 4], dtype=np.int64), "e": np.zeros((0, 3), np.float32)}
    seeds = []
    for suffix in (".safetensors", ".npz"):
        path = os.path.join(folder, "seed" + suffix)
        lorac.save(sd, path)
        with open(path, "rb") as fh:
            seeds.append(fh.read())
    try:
        import torch
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, buf)
        seeds.append(buf.getvalue())
    except Exception:  # torch is optional here
        pass
    return seeds


def mutate(r, blob):
    """A few byte-level mutations of blob: flips, overwrites, inserts, cuts."""
    data = bytearray(blob)
    for _ in range(r.int(0, 6)):
        op = r.int(0, 4)
        pos = r.int(0, max(len(data) - 1, 0)) if data else 0
        if op == 0 and data:
            data[pos] ^= 1 << r.int(0, 7)
        elif op == 1 and data:
            data[pos] = r.int(0, 255)
        elif op == 2:
            data[pos:pos] = r.bytes(r.int(1, 8)) or b"\xff"
        elif op == 3:
            del data[pos:pos + r.int(1, 64)]
        else:  # overwrite 8 bytes with an interesting integer (lengths, offsets)
            value = r.choice([0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, len(data), len(data) + 1])
            data[pos:pos + 8] = value.to_bytes(8, "little")
    return bytes(data)


class LoaderTargets:
    def __init__(self, folder):
        self.folder = folder
        self.seeds = _seed_files(folder)
        self.model = lorac_model()
        self.peft_seeds = [self._peft_seed(kind) for kind in ("plain", "dora", "lora_bias", "tokens")]

    def _peft_seed(self, kind):
        """The files of a PEFT folder: plain LoRA on layer 0, DoRA on both layers stored
        both ways (a magnitude per layer and the weights file's layout metadata),
        LoRA with PEFT's lora_bias on layer 0, or trainable tokens of an Embedding
        "0" beside LoRA on layer 1 (a seed whose layer kinds the fuzzed model lacks)."""
        import lorac
        if kind == "tokens":
            model = lorac.Sequential(lorac.Embedding(6, 4), lorac.Linear(4, 3))
            lorac.get_peft_model(model, lorac.LoraConfig(r=2, target_modules=["1"],
                                                         trainable_token_indices={"0": [1, 4]}))
        elif kind == "dora":
            model = lorac.Sequential(lorac.Linear(4, 3, fan_in_fan_out=True), lorac.Linear(3, 2))
            lorac.inject_lora(model, ["0", "1"], r=2, use_dora=True, fan_in_fan_out=None)
        else:
            model = lorac.Sequential(lorac.Linear(4, 3, r=2, lora_bias=kind == "lora_bias"), lorac.Linear(3, 2))
        model[1 if kind == "tokens" else 0].lora_B.data[...] = 0.5
        seed = os.path.join(self.folder, "peft_seed_" + kind)
        lorac.save_peft_adapter(model, seed)
        files = {}
        for name in os.listdir(seed):
            with open(os.path.join(seed, name), "rb") as fh:
                files[name] = fh.read()
        return files

    def checkpoint(self, r):
        from lorac import checkpoint
        blob = r.bytes(r.int(0, 512)) if r.int(0, 4) == 0 else mutate(r, r.choice(self.seeds))
        path = os.path.join(self.folder, "fuzz.bin")
        with open(path, "wb") as fh:
            fh.write(blob)
        try:
            checkpoint.load(path)
        except ALLOWED as exc:
            note(exc, "checkpoint.load")

    def peft(self, r):
        import lorac
        folder = os.path.join(self.folder, "peft")
        os.makedirs(folder, exist_ok=True)
        for name, blob in r.choice(self.peft_seeds).items():
            if name.endswith(".json") and r.bool():
                config = json.loads(blob)
                for _ in range(r.int(1, 3)):
                    key = r.choice(sorted(config) + ["r", "lora_alpha", "rank_pattern", "peft_type", "use_dora",
                                                       "lora_bias", "trainable_token_indices"])
                    config[key] = random_json(r)
                blob = json.dumps(config).encode()
            elif r.int(0, 2) == 0:
                blob = mutate(r, blob)
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(blob)
        before = {k: v.copy() for k, v in self.model.state_dict().items()}
        structure = repr(self.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lorac.load_peft_adapter(self.model, folder, strict=r.bool())
        except ALLOWED as exc:
            note(exc, "load_peft_adapter")
            after = self.model.state_dict()
            assert repr(self.model) == structure, "a failed load_peft_adapter changed the model's layers"
            assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before), \
                "a failed load_peft_adapter changed the model's parameters"
            return
        self.model(np.ones((2, 4), np.float32))  # what loaded must run
        self.model = lorac_model()


def lorac_model():
    """The model the fuzzed PEFT folders load into."""
    import lorac
    return lorac.Sequential(lorac.Linear(4, 3, r=2), lorac.Linear(3, 2))


def random_json(r, depth=0):
    k = r.int(0, 8)
    if k == 0:
        return None
    if k == 1:
        return r.bool()
    if k == 2:
        return r.choice([0, 1, -1, 2, 8, 2**31, 2**64, 10**30])
    if k == 3:
        return r.choice([0.5, -1.5, 1e308, 0.0])
    if k == 4:
        return r.choice(["", "LORA", "gaussian", "pissa", "none", "all", "(a+)+$", "[", ".*"])
    if k == 5 and depth < 2:
        return [random_json(r, depth + 1) for _ in range(r.int(0, 3))]
    if k == 6 and depth < 2:
        return {r.choice(["0", ".*", "lora", "0.lora_A", "[", "^0$"]): random_json(r, depth + 1)
                for _ in range(r.int(0, 3))}
    return r.int(-3, 16)


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------

def make_target(C, loaders, self_test=False):
    def test_one_input(data):
        if self_test:  # --self-test: prove that a finding fails the run
            raise RuntimeError("fuzz_lorac self-test finding")
        r = Reader(data)
        target = r.int(0, 9)
        with np.errstate(all="ignore"):
            if target < 6:
                fuzz_binding(r, C)
            elif target < 8:
                loaders.checkpoint(r)
            else:
                loaders.peft(r)
    return test_one_input


def watch_rss(limit_gib=3.0):
    """A thread that ends the process (exit status 3) when its resident set
    exceeds limit_gib: under the sanitizers RLIMIT_AS cannot be used, and a
    finding must never push the machine into swapping or the OOM killer."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def run():
        while True:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page
            if rss > limit_gib * 2**30:
                print(f"fuzz_lorac: finding: resident set {rss / 2**30:.1f} GiB > {limit_gib} GiB", flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()


def limit_memory(gib=4):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = gib * 2**30
    if hard == resource.RLIM_INFINITY or hard > want:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("LORAC_FUZZ_SECONDS", 60)))
    parser.add_argument("--engine", choices=("auto", "atheris", "random"),
                        default=os.environ.get("LORAC_FUZZ_ENGINE", "auto"))
    parser.add_argument("--seed", type=int, default=None, help="random engine: seed (default: time)")
    parser.add_argument("--workdir", default=None, help="scratch files and crash inputs (default: a new temp dir)")
    parser.add_argument("--self-test", action="store_true", help="every input is a finding (exit non-zero)")
    parser.add_argument("libfuzzer_args", nargs="*", help="passed to atheris/libFuzzer after --")
    args = parser.parse_args(argv)
    if not os.environ.get("LORAC_UNDER_SANITIZER"):  # ASan reserves terabytes of address space
        limit_memory()
    watch_rss()

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"

    workdir = args.workdir or tempfile.mkdtemp(prefix="lorac-fuzz-")
    os.makedirs(workdir, exist_ok=True)
    if engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["lorac"]):
            import lorac  # noqa: F401
            import lorac._C as C
            from lorac import checkpoint, peft  # noqa: F401
    else:
        import lorac._C as C
    loaders = LoaderTargets(workdir)
    target = make_target(C, loaders, args.self_test)
    print(f"fuzz_lorac: engine={engine} seconds={args.seconds:g} workdir={workdir}", flush=True)

    if engine == "atheris":
        import atheris
        # crash files go to the work folder (printed above), never into the current directory
        flags = [sys.argv[0], f"-max_total_time={max(1, int(args.seconds))}", "-timeout=30",
                 "-rss_limit_mb=3072", "-print_final_stats=1", f"-artifact_prefix={workdir}/",
                 *args.libfuzzer_args]
        atheris.Setup(flags, target)
        atheris.Fuzz()  # exits the process
        return 0

    seed = args.seed if args.seed is not None else int(time.time())
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < deadline:
        data = rng.bytes(int(rng.integers(0, 256)))
        try:
            target(data)
        except BaseException:
            print(f"fuzz_lorac: finding after {runs} runs (random engine, seed {seed}); input {data.hex()}",
                  flush=True)
            raise
        runs += 1
    print(f"fuzz_lorac: {runs} runs, no finding (random engine, seed {seed})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
