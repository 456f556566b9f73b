"""FeatUp for detectron2: ``FeatUpBackbone`` (registered as ``build_featup_backbone``), a bottom-up
wrapper for featup_adapters backbones (``build_featup_adapter_backbone``) and ``add_featup_config``.

Importing this package registers both builders in detectron2's ``BACKBONE_REGISTRY``.
"""
from .config import add_featup_config, config_file
from .backbone import FeatUpBackbone, GuidanceNorm, build_featup_backbone
from .adapter_backbone import AdapterBottomUp, build_featup_adapter_backbone

__all__ = ["add_featup_config", "config_file", "FeatUpBackbone", "GuidanceNorm", "build_featup_backbone",
           "AdapterBottomUp", "build_featup_adapter_backbone"]
