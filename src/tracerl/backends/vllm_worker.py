"""Runs inside vLLM's worker (`LLM(worker_extension_cls=...)`): reload the policy's weights in place.

Kept free of tracerl imports so the engine-core process loads it alone. Two ways in (docs/engines.md §3):
`llm.collective_rpc("tracerl_reload", args=(path, repack))` reads a safetensors file of Hugging Face
parameter names (engine.weight_sync=file; vLLM's own loader fuses q/k/v and gate/up); with
engine.weight_sync=nccl / ipc vLLM's own weight-transfer engine loads the tensors, then the trainer calls
`tracerl_after_update` so both ways end in the same fix-ups.
"""

from __future__ import annotations


class TracerlWeightSync:
    """Mixed into vLLM's worker class."""

    def tracerl_reload(self, path: str, repack: bool | str = True) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            weights = [(name, f.get_tensor(name)) for name in f.keys()]
        self.reload_weights(weights_iterator=iter(weights))
        self.tracerl_after_update(repack)
        return len(weights)

    def tracerl_after_update(self, repack: bool | str = True) -> bool:
        """What every weight update needs after the tensors are in: the tied LM head re-packed (CPU GEMM
        path only; elsewhere nothing is packed and this returns False). The prefix-cache reset is the
        caller's (`LLM.reset_prefix_cache`, outside the worker)."""
        if repack in (False, 0, "false", "0"):  # the server's /collective_rpc passes strings
            return False
        hf = self.vllm_config.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        return self._tracerl_repack_tied_head(self.model_runner.get_model(),
                                              bool(getattr(text, "tie_word_embeddings", False)))

    @staticmethod
    def _tracerl_repack_tied_head(model, tied: bool) -> bool:
        """On CPU a Linear's GEMM weight is packed once at load time (`cpu_linear`, vllm 0.32.0); a reload
        refreshes the layers it loads, but an LM head tied to the embedding keeps the start-up copy, so its
        logits come from the old weights (docs/engines.md §3). Re-tie it to the reloaded embedding and
        re-pack it."""
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or not hasattr(head, "cpu_linear"):
            return False  # not the CPU GEMM path (GPU), nothing packed
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        if tied:
            head.weight = embed.weight
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        return True
