"""onnxshrink's rewrite passes, one module per family. Installed as ``onnxshrink.passes``.

``REGISTRY`` is the one explicit map from pass name to class; nothing registers itself on import.
"""

from __future__ import annotations

if __name__ != "onnxshrink.passes":  # pragma: no cover - packaging guard
    raise ImportError(
        f"the passes package must be imported as 'onnxshrink.passes', not {__name__!r}; "
        "install onnxshrink (pip install -e .) instead of putting its source folder on sys.path"
    )

from onnxshrink.passes import (
    activations,
    cleanup,
    dynamic_quant,
    equalize,
    fold_constants,
    fusions,
    identities,
    layernorm,
    loops,
    prune_channels,
    qdq,
    scales,
    skip_layernorm,
    smoothquant,
    upcast,
)

from onnxshrink.pass_infra import ShrinkPass

REGISTRY: dict[str, type[ShrinkPass]] = {
    fold_constants.FoldConstantsPass.name: fold_constants.FoldConstantsPass,
    cleanup.CsePass.name: cleanup.CsePass,
    cleanup.DedupInitializersPass.name: cleanup.DedupInitializersPass,
    cleanup.DeadCodePass.name: cleanup.DeadCodePass,
    identities.EliminateIdentitiesPass.name: identities.EliminateIdentitiesPass,
    loops.LoopInvariantsPass.name: loops.LoopInvariantsPass,
    fusions.FuseBatchNormPass.name: fusions.FuseBatchNormPass,
    fusions.FuseConvBiasPass.name: fusions.FuseConvBiasPass,
    fusions.FuseGemmPass.name: fusions.FuseGemmPass,
    activations.FuseActivationsPass.name: activations.FuseActivationsPass,
    scales.FoldScalarScalesPass.name: scales.FoldScalarScalesPass,
    layernorm.FuseLayerNormPass.name: layernorm.FuseLayerNormPass,
    skip_layernorm.AvoidSkipLayerNormPass.name: skip_layernorm.AvoidSkipLayerNormPass,
    qdq.QDQPass.name: qdq.QDQPass,
    dynamic_quant.DynamicQuantPass.name: dynamic_quant.DynamicQuantPass,
    equalize.CrossLayerEqualizationPass.name: equalize.CrossLayerEqualizationPass,
    smoothquant.SmoothQuantPass.name: smoothquant.SmoothQuantPass,
    prune_channels.PruneChannelsPass.name: prune_channels.PruneChannelsPass,
    upcast.UpcastFloat16Pass.name: upcast.UpcastFloat16Pass,
}

__all__ = ["REGISTRY"]
