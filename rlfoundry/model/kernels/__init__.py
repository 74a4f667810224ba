"""Native CPU kernels of our own, built on first use with the machine's C++ compiler.

`rlfoundry_kernels::decode_attention` (decode_attention.cpp), the attention of the engine's
compiled decode steps on CPU in fp32, and `small_linear` / `gathered_linear` (small_products.cpp),
the products of compiled CPU inference over a few rows (`glm4_moe.small_linear`, the experts'
`_forward_gathered`), and `invariant_matmul` / `invariant_grouped_matmul` (invariant_products.cpp),
the forward products of the batch-invariant mode (`glm4_moe.set_batch_invariant`), which loads
them too, and that mode's attention, RMSNorm, rotary embedding, SwiGLU and the experts' weighted
sum, forward and backward (`invariant_attention`, invariant_attention.cpp; `rms_norm`, `rope`,
`swiglu`, `combine`, invariant_pointwise.cpp; common.h holds what the four sources written with
ATen's vectors share). `load()` compiles the sources into one shared library against the installed
torch (10 - 15 s here, once per machine: the library is kept in ~/.cache/rlfoundry/kernels under a
name that hashes the sources, torch's version, the compiler and the CPU's features, since it is
built for this CPU with -march=native) and registers the ops with torch, so that torch.compile'd
graphs call them like any other; the libraries compiled ahead of time (rollout/aot.py) call their
C entry points. Nothing else depends on them: where the compiler or the build fails, `load()`
says why once and returns False, and attention and the products keep their pure-torch forms (the
batch-invariant mode: MKL's products with padded rows, invariant on some CPUs only).

The compiler is the one inductor uses too (`$CXX`, else g++); compiled decoding needs it anyway.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.cpp", "small_products.cpp",
                                                        "invariant_products.cpp", "invariant_attention.cpp",
                                                        "invariant_pointwise.cpp")]
HEADERS = [Path(__file__).with_name("common.h")]
"""Included by the sources: part of what names the built library, as the sources are."""
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None}  # None: not tried; True / False: the outcome


def cache_dir() -> Path:
    """Where built libraries are kept: $RLFOUNDRY_KERNEL_CACHE, else $XDG_CACHE_HOME/rlfoundry/kernels
    (~/.cache/... by default)."""
    if os.environ.get("RLFOUNDRY_KERNEL_CACHE"):
        return Path(os.environ["RLFOUNDRY_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlfoundry" / "kernels"


def cpu_features() -> str:
    """The CPU's feature flags (/proc/cpuinfo): what a library built for this CPU depends on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_command(cxx: str, sources: list[Path], out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    libs = library_paths()
    return [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            *[f"-I{p}" for p in include_paths()], *map(str, sources), "-o", str(out),
            *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu", "-ltorch"]


def compiler() -> str:
    """The C++ compiler: $CXX, else g++ (inductor's choice too)."""
    return os.environ.get("CXX", "g++")


def library_path() -> Path:
    """The shared library `load()` builds and loads on this machine."""
    cxx = compiler()
    key = hashlib.sha256("\n".join([*(src.read_text() for src in SOURCES + HEADERS), torch.__version__, cxx,
                                    cpu_features(),
                                    " ".join(_build_command(cxx, [Path("SRC")], Path("OUT")))]).encode())
    return cache_dir() / f"rlfoundry_kernels_{key.hexdigest()[:16]}.so"


def load() -> bool:
    """Build (once per machine) and register the native ops; True when they are usable. Thread-
    and process-safe: concurrent builds each write their own file and rename it into place."""
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _load()
        return bool(_state["loaded"])


def loaded() -> bool:
    """True when `load()` succeeded in this process (no build is attempted here)."""
    return bool(_state["loaded"])


def applies(device: torch.device, *dtypes: torch.dtype, load_now: bool = False) -> bool:
    """Whether the native ops serve tensors of these dtypes on this device: fp32 on CPU, with the
    library loaded in this process — or, with `load_now`, built and loaded now where the device and
    dtypes fit (`load()`; traced code asks without: `loaded()` only). The one test that the engine
    (its KV cache's key layout) and the model (`glm4_moe.decode_attention`) both make."""
    if device.type != "cpu" or any(d != torch.float32 for d in dtypes):
        return False
    return load() if load_now else loaded()


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """`path`, built by `build(tmp)` into a file of its own beside it and renamed into place unless
    it exists already: concurrent builders (threads, processes) never see a half-written file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            build(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _compile_library(out: Path) -> None:
    cmd = _build_command(compiler(), SOURCES, out)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}): {(r.stderr or r.stdout)[-2000:]}")


def _load() -> bool:
    try:
        path = build_once(library_path(), _compile_library)
        # loaded with its symbols global first: the libraries aot.py compiles ahead of time call
        # its C entry points (aoti_torch_cpu_small_linear, ...) directly, resolved at their load
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        torch.ops.load_library(str(path))
    except Exception as e:  # no compiler, a failed build, an unwritable cache: the torch path stays
        warnings.warn(f"rlfoundry's native CPU kernels are unavailable ({e}); compiled decoding "
                      "attends with batched matrix products and computes its small products as inductor's "
                      "reductions instead, and batch-invariant mode takes MKL's products with padded rows (invariant on "
                      "some CPUs only)", RuntimeWarning, stacklevel=3)
        return False

    @torch.library.register_fake("rlfoundry_kernels::decode_attention")
    def _(q, k, v, positions, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("rlfoundry_kernels::small_linear")
    def _(x, w):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("rlfoundry_kernels::invariant_attention")
    def _(q, k, v, pos, seq, keys, scale):
        return q.new_empty(q.shape), q.new_empty((*q.shape[:-1], 2))

    @torch.library.register_fake("rlfoundry_kernels::invariant_attention_backward")
    def _(dout, q, k, v, out, stats, pos, seq, keys, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("rlfoundry_kernels::rms_norm")
    def _(x, w, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:1])

    @torch.library.register_fake("rlfoundry_kernels::rms_norm_backward")
    def _(g, x, w, r):
        return x.new_empty(x.shape), w.new_empty(w.shape)

    @torch.library.register_fake("rlfoundry_kernels::rope")
    def _(x, cos, sin, R):
        return x.new_empty(x.shape)

    @torch.library.register_fake("rlfoundry_kernels::rope_backward")
    def _(g, cos, sin, R):
        return g.new_empty(g.shape)

    @torch.library.register_fake("rlfoundry_kernels::swiglu")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("rlfoundry_kernels::swiglu_backward")
    def _(dh, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    @torch.library.register_fake("rlfoundry_kernels::combine")
    def _(y, rows, w):
        return y.new_empty((w.shape[0], y.shape[1]))

    @torch.library.register_fake("rlfoundry_kernels::combine_backward")
    def _(g, y, rows, w):
        return y.new_empty(y.shape), w.new_empty(w.shape)

    @torch.library.register_fake("rlfoundry_kernels::gathered_linear")
    def _(x, w, ids):
        return x.new_empty((*ids.shape, w.shape[1]))

    return True
