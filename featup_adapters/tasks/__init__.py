"""Downstream tasks on upsampled features: segmentation fine-tuning, FeatUp's linear probe, and
segmentation data that needs no download. Submodules import nothing heavy until used.

- :mod:`.segmentation`: ``build_segmentation_model``, ``finetune``, ``evaluate``
- :mod:`.probe`: ``linear_probe`` (low-res vs bilinear vs JBU)
- :mod:`.seg_data`: ``VOCFolder``, ``TextureMosaic``, ``voc_photo``, ``arc2017_photo``, ``write_voc_folder``
- :mod:`.metrics`: ``confusion_matrix``, ``scores_from_confusion``, ``SegMeter``
- :mod:`.cli`: ``add_finetune_seg_parser``, ``add_probe_parser`` (mounted in ``featup-adapters``)
"""
import importlib

_LAZY = {
    "SegmentationModel": ".segmentation", "build_segmentation_model": ".segmentation", "finetune": ".segmentation",
    "evaluate": ".segmentation", "linear_probe": ".probe", "VOCFolder": ".seg_data", "TextureMosaic": ".seg_data",
    "voc_photo": ".seg_data", "arc2017_photo": ".seg_data", "write_voc_folder": ".seg_data",
    "SegMeter": ".metrics", "confusion_matrix": ".metrics", "scores_from_confusion": ".metrics",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featup_adapters.tasks' has no attribute '{name}'")
