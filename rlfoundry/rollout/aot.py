"""Engine functions compiled ahead of time by AOTInductor: the plain decode step and the greedy
speculative cycle (`AOTStep`), and the prefill of one prompt (`AOTPrefill`).

A torch.compile'd call pays, before and after its graph, for dynamo's guards (~1000 checks on the
model's modules and attributes, since the graph holds them as constants) and for the Python layers
that hand ~90 tensors (the weights, the KV cache) to the graph and take its outputs back: at batch
64 on the shipped model that is a fifth of a decode step. Here the same function
(`engine.decode_forward` over one token a row, or `engine.greedy_cycle` over k + 1) is exported
with `torch.export` once per batch-size regime (dynamo specialises batch 1, and the MoE blocks
change path at the token counts of `Glm4MoeForCausalLM.token_switches`), compiled by AOTInductor
into a shared library, and called with the step's few tensors: no guards, the weights bound once.
A prefill of one prompt (batch 1: the latency case, where these fixed costs weigh most) is one more
library, the prompt's length a dynamic size in it (the same function over T tokens at positions
0..T-1: `decode_forward`, or a greedy speculative engine's `greedy_cycle`, whose MTP layer then
takes the prompt's pairs and drafts the first cycle).
The native kernels' ops in the graph (decode attention, the small products) are called through
their C entry points (`_c_shims`), not the dispatcher. The outputs equal the torch.compile'd
function's up to float rounding (its own inductor build of the same graph: the same tokens and
routing, logits within ~5e-6 of their scale; tests/test_aot.py).

Weights: the library holds pointers to the model's own parameters and buffers
(`load_constants(user_managed=True)`), so weight updates copied into them in place — as
`Engine.update_weights` does — are seen at the next step; `bind_weights` rebinds them after
anything that replaced the tensors themselves. Inductor would write small constant tensors into
its kernels as literals (the routers' correction biases), which neither a rebinding nor an update
would reach; the build keeps them tensors (`_OPTIONS`). The KV caches are passed at every call as
their storage tensors (`KVCache.storage`).

Compiling takes ~12 s a regime here. The packages are kept on disk beside the native kernels
(`kernels.cache_dir()`), named by a hash of the exported program (its code with shapes and
strides, its dynamic ranges), the build options and flags, torch's version, the CPU's features
and the native kernels' library (whose C entry points it calls: a change to their sources builds
the packages again): a second engine, or process, with the same model shapes and limits loads them instead
(3 ms a package here; the first load in a process ~2 s). Where export or the build fails, `build` says why once and returns None, and the
engine keeps its torch.compile'd function.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..model import kernels
from ..model.glm4_moe import CacheStep, Glm4MoeForCausalLM, KVCache


class _Traced(nn.Module):
    """`fn(model, ids, *steps, *static, *batch_args)` with one `CacheStep` per KV cache, the caches
    given as tensors (what export can trace): each one's RoPE tables and keys and values of every
    layer (`KVCache.storage`), and a tensor of the key count's length (export gives a dimension,
    not an int, a dynamic range). Every cache's step takes rows 0..B-1 at the same positions."""

    def __init__(self, model: Glm4MoeForCausalLM, fn: Callable, static: tuple):
        super().__init__()
        self.model, self.fn, self.static = model, fn, static

    def forward(self, ids_BT: Tensor, position_ids_BT: Tensor, keys_S: Tensor, batch_args: tuple[Tensor, ...],
                tables: tuple[tuple[Tensor, Tensor], ...], storages: tuple[tuple[Tensor, ...], ...]):
        B, S = ids_BT.shape[0], keys_S.shape[0]
        slots = torch.arange(B, device=ids_BT.device)
        steps = [CacheStep(KVCache.over_storage(list(storage), table), slots, position_ids_BT, None, S, (0, B))
                 for table, storage in zip(tables, storages)]
        return self.fn(self.model, ids_BT, *steps, *self.static, *batch_args)


def regimes(max_batch: int, switches: list[int]) -> list[tuple[int, int]]:
    """The batch-size ranges [lo, hi] that each take one graph: batch 1 (dynamo and export
    specialise a size of 1), then from 2 up to max_batch, split at the batch sizes `switches`
    where the model's path changes."""
    firsts = sorted({1, 2} | {n for n in switches if 2 < n <= max_batch})
    ends = [f - 1 for f in firsts[1:]] + [max_batch]
    return [(lo, hi) for lo, hi in zip(firsts, ends) if lo <= hi]


class _Libraries:
    """AOTInductor libraries of one engine function over `caches`, `runners` by the batch-size range
    [lo, hi] each serves: the weights bound to the model's own tensors, the caches' tensors passed at
    every call after the call's own inputs."""

    def __init__(self, model: Glm4MoeForCausalLM, caches: list[KVCache], runners: dict[tuple[int, int], object]):
        self.model, self.caches, self.runners = model, caches, runners
        self._by_batch: list[object | None] = [None] * (max(hi for _, hi in runners) + 1)
        for (lo, hi), runner in runners.items():
            self._by_batch[lo:hi + 1] = [runner] * (hi - lo + 1)
        self._out_spec = pytree.treespec_loads(next(iter(runners.values())).loader.get_call_spec()[1])
        self._fixed = [t for c in caches for t in c.rope] + [t for c in caches for t in c.storage]
        self.bind_weights()

    def bind_weights(self) -> None:
        """Point every library at the model's current parameters and buffers (they are read in
        place: updates copied into them need no call; a replaced tensor does)."""
        named = {f"model.{n}": t for n, t in [*self.model.named_parameters(remove_duplicate=False),
                                              *self.model.named_buffers(remove_duplicate=False)]}
        self._weights = named  # the libraries hold raw pointers: keep every tensor alive
        for runner in self.runners.values():
            runner.load_constants({n: named[n] for n in runner.get_constant_fqns()},
                                  check_full_update=True, user_managed=True)

    def _run(self, ids_BT: Tensor, position_ids_BT: Tensor, keys_S: Tensor, batch_args: tuple[Tensor, ...]):
        """The library of ids_BT's batch size on these inputs: what `fn` returns."""
        flat = self._by_batch[ids_BT.shape[0]].loader.run([ids_BT, position_ids_BT, keys_S, *batch_args, *self._fixed])
        return pytree.tree_unflatten(flat, self._out_spec)


class AOTStep(_Libraries):
    """`fn(model, ids [B, T], *steps, *static, *batch_args)` over rows 0..B-1 of `caches` (one
    `CacheStep` each, the same positions), one AOTInductor library per batch regime: the engine's
    plain decode step (`decode_forward`, T = 1) and greedy speculative cycle (`greedy_cycle`, T =
    k + 1, static (k,), batch_args (last_B,)). Call it with the ids [B, T], their positions
    [B, T], the key count and the batch_args; it returns what `fn` returns."""

    def __init__(self, model: Glm4MoeForCausalLM, caches: list[KVCache], T: int, runners: dict[tuple[int, int], object]):
        super().__init__(model, caches, runners)
        self.T = T
        self.max_keys = _max_keys(caches[0].max_len, T)
        self._keys = torch.empty(self.max_keys, device=caches[0].lens.device)  # sliced to the key count

    @classmethod
    def build(cls, model: Glm4MoeForCausalLM, caches: list[KVCache], max_batch: int, fn: Callable, T: int = 1,
              static: tuple = (), batch_args: int = 0) -> "AOTStep | None":
        """Export and compile (or load from the disk cache) one library per batch regime (where
        the model's path changes for B x T tokens or, in the MTP layer's one-token drafts, for B);
        `batch_args` long tensors [B] follow. None, with a warning, where that fails."""
        switches = [-(-n // t) for n in model.token_switches() for t in {T, 1}]
        runners = _built(fn, lambda: {r: _compile(model, caches, fn, T, static, batch_args, *r)
                                      for r in regimes(max_batch, switches)})
        return None if runners is None else cls(model, caches, T, runners)

    def applies(self, num_keys: int) -> bool:
        """Whether a call over this many keys runs here: all but those that read a cache's whole
        tensors (`_max_keys`), which the engine's torch.compile'd functions take."""
        return num_keys <= self.max_keys

    def __call__(self, ids_BT: Tensor, position_ids_BT: Tensor, num_keys: int, *batch_args: Tensor):
        return self._run(ids_BT, position_ids_BT, self._keys[:max(num_keys, self.T + 1)], batch_args)


class AOTPrefill(_Libraries):
    """`fn(model, ids [1, T], *steps, *static, *batch_args)` over one prompt of T tokens, T in
    lo..hi, at positions 0..T-1 of row 0 of `caches`: the ahead-of-time prefill at batch 1 (the
    plain engine's `decode_forward`; a greedy speculative engine's `greedy_cycle`, static (k,),
    batch_args (last_B,)). One library, T a dynamic size in it; call it with the ids [1, T] and the
    batch_args."""

    def __init__(self, model: Glm4MoeForCausalLM, caches: list[KVCache], lo: int, hi: int, runner: object):
        super().__init__(model, caches, {(1, 1): runner})
        self.lo, self.hi = lo, hi
        self._keys = torch.empty(hi, device=caches[0].lens.device)  # sliced to T
        self._positions = torch.arange(hi, device=caches[0].lens.device)[None]

    @classmethod
    def build(cls, model: Glm4MoeForCausalLM, caches: list[KVCache], fn: Callable, lo: int, hi: int,
              static: tuple = (), batch_args: int = 0) -> "AOTPrefill | None":
        """Export and compile (or load from the disk cache) the library for prompts of lo..hi
        tokens (all of one path of the model: no token switch in the range, and hi below the
        cache's end, see `_max_keys`). None, with a warning, where that fails."""
        runner = _built(fn, lambda: _compile(model, caches, fn, hi, static, batch_args, 1, 1, prompt=(lo, hi)))
        return None if runner is None else cls(model, caches, lo, hi, runner)

    def applies(self, T: int) -> bool:
        """Whether a prompt of T tokens runs here."""
        return self.lo <= T <= self.hi

    def __call__(self, ids_1T: Tensor, *batch_args: Tensor):
        T = ids_1T.shape[1]
        return self._run(ids_1T, self._positions[:, :T], self._keys[:T], batch_args)


def _built(fn: Callable, build: Callable):
    """build(), or None with a warning where it fails (an export or a build: the engine's
    torch.compile'd function stays)."""
    try:
        with warnings.catch_warnings():  # (torch's own use of a deprecated pytree class, at load)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return build()
    except Exception as e:
        warnings.warn(f"the ahead-of-time compiled {getattr(fn, '__name__', fn)} is unavailable "
                      f"({type(e).__name__}: {str(e)[:500]}); the engine keeps its torch.compile'd one",
                      RuntimeWarning, stacklevel=3)
        return None


def _max_keys(max_len: int, T: int) -> int:
    """The most keys a call may attend over: export specialises a slice that is a whole tensor
    (its layout changes), so every read must stop short of max_len — a decode step's keys, and a
    speculative cycle's k - 1 further drafts of the MTP layer after its T = k + 1 pairs."""
    return max_len - max(1, T - 1)


_OPTIONS = {
    # weights are bound at load time (`bind_weights`), not shipped in the library
    "aot_inductor.package_constants_in_so": False,
    # every weight and buffer stays a tensor the library reads: inductor otherwise writes small
    # ones into the kernels as literals (the routers' correction biases: 16 floats), so that a
    # package cached for one model would decode another's with the first one's values, and a
    # weight update would not reach them
    "always_keep_tensor_constants": True,
}


def _c_shims() -> dict:
    """The native ops (`rlfoundry.model.kernels`: decode attention, the small products) that the
    library calls through their C entry points, with their declarations: a direct call, where the
    dispatcher's way (AOTInductor's proxy executor) costs about what a small product itself does.
    Empty where the kernels are not loaded."""
    if not kernels.loaded():
        return {}
    ops = torch.ops.rlfoundry_kernels
    return {ops.decode_attention.default: ["AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, "
                                           "AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle positions, "
                                           "double scale, AtenTensorHandle* ret0)"],
            ops.small_linear.default: ["AOTITorchError aoti_torch_cpu_small_linear(AtenTensorHandle x, "
                                       "AtenTensorHandle w, AtenTensorHandle* ret0)"],
            ops.gathered_linear.default: ["AOTITorchError aoti_torch_cpu_gathered_linear(AtenTensorHandle x, "
                                          "AtenTensorHandle w, AtenTensorHandle ids, AtenTensorHandle* ret0)"]}


def _build_flags() -> str:
    """What decides how inductor builds the library besides the program: its debug builds (-O0,
    which the test suite asks for to compile faster) against the optimised ones."""
    aoti = torch._inductor.config.aot_inductor
    return repr([os.environ.get("TORCHINDUCTOR_DEBUG_COMPILE"), os.environ.get("TORCHINDUCTOR_DEBUG_SYMBOL"),
                 aoti.debug_compile, aoti.debug_symbols, aoti.compile_wrapper_opt_level])


def _compile(model: Glm4MoeForCausalLM, caches: list[KVCache], fn: Callable, T: int, static: tuple,
             batch_args: int, lo: int, hi: int, prompt: tuple[int, int] | None = None):
    """The loaded AOTInductor package of `fn` for batch sizes lo..hi and key counts T + 1 to
    `_max_keys`; or, with `prompt` (t_lo, t_hi), of a prefill: one row of T tokens at positions
    0..T-1 over T keys, for T in t_lo..t_hi."""
    device, L = caches[0].lens.device, caches[0].max_len
    if prompt:  # one row (the example at the range's top: export specialises sizes 0 and 1)
        B, T = 1, prompt[1]
        S, positions = T, torch.arange(T, device=device)[None]
        tokens = torch.export.Dim("T", min=prompt[0], max=prompt[1])
        rows, ids_shape, keys_shape = None, {1: tokens}, {0: tokens}
    else:
        B, S, positions = hi, T + 1, torch.arange(1, T + 1, device=device).repeat(hi, 1)
        batch = torch.export.Dim("B", min=lo, max=hi) if lo < hi else None
        rows = {0: batch} if batch else None
        ids_shape, keys_shape = rows, {0: torch.export.Dim("S", min=T + 1, max=_max_keys(L, T))}
    args = (torch.zeros(B, T, dtype=torch.long, device=device), positions, torch.empty(S, device=device),
            tuple(torch.zeros(B, dtype=torch.long, device=device) for _ in range(batch_args)),
            tuple(c.rope for c in caches), tuple(tuple(c.storage) for c in caches))
    shapes = (ids_shape, ids_shape, keys_shape, tuple(rows for _ in range(batch_args)),
              tuple((None, None) for _ in caches), tuple((None,) * len(c.storage) for c in caches))
    with torch.no_grad():
        ep = torch.export.export(_Traced(model, fn, static), args, dynamic_shapes=shapes, strict=False)
    code = ep.graph_module.print_readable(print_output=False, include_stride=True, include_device=True)
    key = hashlib.sha256("\n".join([code, str(ep.range_constraints), str(sorted(_OPTIONS.items())), _build_flags(),
                                    torch.__version__, kernels.cpu_features(), kernels.compiler(),
                                    kernels.library_path().name if _c_shims() else ""]).encode()).hexdigest()[:16]
    path = kernels.cache_dir() / f"{'prompt_' if prompt else ''}{getattr(fn, '__name__', 'step')}_{key}.pt2"

    def package(out: Path) -> None:
        with torch._inductor.config.patch({**_OPTIONS, "aot_inductor.custom_ops_to_c_shims": _c_shims()}):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(out))

    kernels.build_once(path, package)
    return _load(path)


def _mapped_files() -> set[str]:
    """The files mapped into this process (/proc/self/maps; empty where there is none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}


def _load(path: Path):
    """`aoti_load_package(path)`, without the copy it leaves behind: the loader extracts the package
    (its library, ~8 MB here) into a directory of its own under the temporary directory and removes
    it only when the loader is destroyed — which a killed engine server, or any process exiting with
    the loader alive (the engines' are, and frozen out of the collector at that), never does: ~40 MB
    of /tmp an engine server's start, for good. Once the library is mapped (dlopen) nothing reads
    that directory on CPU, so it goes now: found as the new mapped library's `aotinductor_*`
    ancestor directly under the temporary directory (this process's own mapping: no other process's
    extraction is touched); where that is not what the loader made, nothing is removed."""
    before = _mapped_files()
    runner = torch._inductor.aoti_load_package(str(path))
    roots = {Path(tempfile.gettempdir()).resolve(), Path("/tmp").resolve()}
    for mapped in _mapped_files() - before:
        for d in Path(mapped).parents:
            if d.parent in roots and d.name.startswith("aotinductor_"):
                shutil.rmtree(d, ignore_errors=True)
    return runner
