"""Runs inside vLLM's worker (`LLM(worker_extension_cls=...)`): reload the policy's weights in place.

Kept free of tracerl imports so the engine-core process loads it alone. Called through
`llm.collective_rpc("tracerl_reload", args=(path, repack))`; the path is a safetensors file of Hugging
Face parameter names (vLLM's own loader fuses q/k/v and gate/up).
"""

from __future__ import annotations


class TracerlWeightSync:
    """Mixed into vLLM's worker class."""

    def tracerl_reload(self, path: str, repack: bool | str = True) -> int:
        from safetensors import safe_open

        repack = repack not in (False, 0, "false", "0")  # the server's /collective_rpc passes strings
        with safe_open(path, framework="pt") as f:
            weights = [(name, f.get_tensor(name)) for name in f.keys()]
        self.reload_weights(weights_iterator=iter(weights))
        model = self.model_runner.get_model()
        if repack:
            hf = self.vllm_config.model_config.hf_config
            text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
            self._tracerl_repack_tied_head(model, bool(getattr(text, "tie_word_embeddings", False)))
        return len(weights)

    @staticmethod
    def _tracerl_repack_tied_head(model, tied: bool) -> None:
        """On CPU a Linear's GEMM weight is packed once at load time (`cpu_linear`); a reload refreshes the
        layers it loads, but an LM head tied to the embedding keeps the start-up copy, so its logits come
        from the old weights (docs/engines.md §3). Re-tie it to the reloaded embedding and re-pack it."""
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or not hasattr(head, "cpu_linear"):
            return  # not the CPU GEMM path (GPU), nothing packed
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        if tied:
            head.weight = embed.weight
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
