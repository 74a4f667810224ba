"""The engine's plain decode step compiled ahead of time by AOTInductor.

A torch.compile'd call pays, before and after its graph, for dynamo's guards (~1000 checks on the
model's modules and attributes, since the graph holds them as constants) and for the Python layers
that hand ~90 tensors (the weights, the KV cache) to the graph and take its outputs back: at batch
64 on the shipped model that is a fifth of a decode step. Here the same function
(`engine.decode_forward`, one token a row) is exported with `torch.export` once per batch-size
regime (dynamo specialises batch 1, and the MoE blocks change path at the token counts of
`Glm4MoeForCausalLM.token_switches`), compiled by AOTInductor into a shared library, and called
with the step's few tensors: no guards, the weights bound once. The outputs are the compiled
graph's to the bit (same inductor lowering; a test checks it).

Weights: the library holds pointers to the model's own parameters and buffers
(`load_constants(user_managed=True)`), so weight updates copied into them in place — as
`Engine.update_weights` does — are seen at the next step; `bind_weights` rebinds them after
anything that replaced the tensors themselves. The KV cache is passed at every call as its storage
tensors (`KVCache.storage`).

Compiling takes ~12 s a regime here. The packages are kept on disk beside the native kernels
(`kernels.cache_dir()`), named by a hash of the exported program (its code with shapes and
strides, its dynamic ranges), torch's version and the CPU's features: a second engine, or process,
with the same model shapes and limits loads them in well under a second. Where export or the
build fails, `build` says why once and returns None, and the engine keeps its torch.compile'd
step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..model import kernels
from ..model.glm4_moe import CacheStep, Glm4MoeForCausalLM, KVCache


class _Step(nn.Module):
    """`fn(model, ids, step)` over a KV cache given as tensors (what export can trace): the keys
    and values of every layer (`KVCache.storage`), the RoPE tables, and a tensor of the key count's
    length (export gives a dimension, not an int, a dynamic range)."""

    def __init__(self, model: Glm4MoeForCausalLM, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, ids_B1: Tensor, position_ids_B1: Tensor, keys_S: Tensor, cos: Tensor, sin: Tensor,
                storage: tuple[Tensor, ...]):
        cache = KVCache.over_storage(list(storage), (cos, sin))
        B = ids_B1.shape[0]
        step = CacheStep(cache, torch.arange(B, device=ids_B1.device), position_ids_B1, None, keys_S.shape[0], (0, B))
        return self.fn(self.model, ids_B1, step)


def regimes(max_batch: int, switches: list[int]) -> list[tuple[int, int]]:
    """The batch-size ranges [lo, hi] that each take one graph: batch 1 (dynamo and export
    specialise a size of 1), then from 2 up to max_batch, split where the model's path changes."""
    firsts = sorted({1, 2} | {n for n in switches if 2 < n <= max_batch})
    ends = [f - 1 for f in firsts[1:]] + [max_batch]
    return [(lo, hi) for lo, hi in zip(firsts, ends) if lo <= hi]


class AOTDecodeStep:
    """`decode_forward(model, ids [B, 1], step)` for the rows 0..B-1 of `cache`, one AOTInductor
    library per batch regime. Call it with the step's token ids [B, 1], their positions [B, 1] and
    the key count; it returns what `decode_forward` returns."""

    def __init__(self, model: Glm4MoeForCausalLM, cache: KVCache, runners: dict[tuple[int, int], object]):
        self.model, self.cache, self.runners = model, cache, runners
        self._by_batch: list[object | None] = [None] * (max(hi for _, hi in runners) + 1)
        for (lo, hi), runner in runners.items():
            self._by_batch[lo:hi + 1] = [runner] * (hi - lo + 1)
        self._keys = torch.empty(cache.max_len, device=cache.lens.device)  # sliced to the key count
        self._out_spec = pytree.treespec_loads(next(iter(runners.values())).loader.get_call_spec()[1])
        self._fixed = [*cache.rope, *cache.storage]
        self.bind_weights()

    @classmethod
    def build(cls, model: Glm4MoeForCausalLM, cache: KVCache, max_batch: int, fn: Callable) -> "AOTDecodeStep | None":
        """Export and compile (or load from the disk cache) one library per regime of
        `regimes(max_batch, model.token_switches())`; None, with a warning, where that fails."""
        try:
            with warnings.catch_warnings():  # (torch's own use of a deprecated pytree class, at load)
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                runners = {r: _compile(model, cache, fn, *r) for r in regimes(max_batch, model.token_switches())}
        except Exception as e:  # an export or a build that fails: the torch.compile'd step stays
            warnings.warn(f"the ahead-of-time compiled decode step is unavailable ({type(e).__name__}: "
                          f"{str(e)[:500]}); decoding keeps the torch.compile'd step", RuntimeWarning, stacklevel=2)
            return None
        return cls(model, cache, runners)

    def bind_weights(self) -> None:
        """Point every library at the model's current parameters and buffers (they are read in
        place: updates copied into them need no call; a replaced tensor does)."""
        named = {f"model.{n}": t for n, t in [*self.model.named_parameters(remove_duplicate=False),
                                              *self.model.named_buffers(remove_duplicate=False)]}
        self._weights = named  # the libraries hold raw pointers: keep every tensor alive
        for runner in self.runners.values():
            runner.load_constants({n: named[n] for n in runner.get_constant_fqns()},
                                  check_full_update=True, user_managed=True)

    def applies(self, num_keys: int) -> bool:
        """Whether a step over this many keys runs here: all but a step over the whole cache
        (`_compile`), which the engine's torch.compile'd step takes."""
        return num_keys < self.cache.max_len

    def __call__(self, ids_B1: Tensor, position_ids_B1: Tensor, num_keys: int):
        runner = self._by_batch[ids_B1.shape[0]]
        flat = runner.loader.run([ids_B1, position_ids_B1, self._keys[:max(num_keys, 2)], *self._fixed])
        return pytree.tree_unflatten(flat, self._out_spec)


_OPTIONS = {
    # weights are bound at load time (`bind_weights`), not shipped in the library
    "aot_inductor.package_constants_in_so": False,
    # every weight and buffer stays a tensor the library reads: inductor otherwise writes small
    # ones into the kernels as literals (the routers' correction biases: 16 floats), so that a
    # package cached for one model would decode another's with the first one's values, and a
    # weight update would not reach them
    "always_keep_tensor_constants": True,
}


def _build_flags() -> str:
    """What decides how inductor builds the library besides the program: its debug builds (-O0,
    which the test suite asks for to compile faster) against the optimised ones."""
    aoti = torch._inductor.config.aot_inductor
    return repr([os.environ.get("TORCHINDUCTOR_DEBUG_COMPILE"), os.environ.get("TORCHINDUCTOR_DEBUG_SYMBOL"),
                 aoti.debug_compile, aoti.debug_symbols, aoti.compile_wrapper_opt_level])


def _compile(model: Glm4MoeForCausalLM, cache: KVCache, fn: Callable, lo: int, hi: int):
    """The loaded AOTInductor package of `fn` for batch sizes lo..hi and key counts 2..max_len - 1
    (a step over the whole cache reads whole tensors, whose layout export specialises)."""
    device, L = cache.lens.device, cache.max_len
    B, S = hi, min(2, L)
    args = (torch.zeros(B, 1, dtype=torch.long, device=device), torch.full((B, 1), S - 1, device=device),
            torch.empty(S, device=device), *cache.rope, tuple(cache.storage))
    batch = torch.export.Dim("B", min=lo, max=hi) if lo < hi else None
    keys = torch.export.Dim("S", min=2, max=L - 1)
    shapes = ({0: batch} if batch else None, {0: batch} if batch else None, {0: keys}, None, None,
              (None,) * len(cache.storage))
    with torch.no_grad():
        ep = torch.export.export(_Step(model, fn), args, dynamic_shapes=shapes, strict=False)
    code = ep.graph_module.print_readable(print_output=False, include_stride=True, include_device=True)
    key = hashlib.sha256("\n".join([code, str(ep.range_constraints), str(sorted(_OPTIONS.items())), _build_flags(),
                                    torch.__version__, kernels.cpu_features(), kernels.compiler()]).encode()).hexdigest()[:16]
    path = kernels.cache_dir() / f"decode_step_{key}.pt2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            with torch._inductor.config.patch(_OPTIONS):
                torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return torch._inductor.aoti_load_package(str(path))
