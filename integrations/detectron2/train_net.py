#!/usr/bin/env python
"""Train / evaluate a detectron2 semantic segmentation model on FeatUp-upsampled features.

Standard detectron2 command line (DefaultTrainer):

    python integrations/detectron2/train_net.py \
        --config-file integrations/detectron2/configs/semantic_R_50_FeatUp_JBU_1x.yaml --num-gpus 8
    python integrations/detectron2/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth

Your own VOC-style data (images + index-PNG masks, 255 = ignore) without writing code:

    python integrations/detectron2/train_net.py --config-file ... \
        --register-sem-seg mydata_train=IMAGES_DIR:MASKS_DIR --register-sem-seg mydata_val=...:... \
        DATASETS.TRAIN "('mydata_train',)" DATASETS.TEST "('mydata_val',)" MODEL.SEM_SEG_HEAD.NUM_CLASSES 21
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: keep this folder off sys.path.  An installed featup_adapters (regular or
    # editable) brings this package as featup_adapters.integrations.detectron2 and its compiled
    # extension; only without one is the clone's root put on sys.path (its featup_adapters is the
    # source tree, whose extension exists only after `python setup.py build_ext --inplace`).
    import importlib.util

    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    try:
        _installed = importlib.util.find_spec("featup_adapters.integrations.detectron2") is not None
    except ImportError:
        _installed = False
    if not _installed:
        sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import detectron2.data.transforms as T  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,  # noqa: E402
                             build_detection_train_loader)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler  # noqa: E402

try:  # noqa: E402
    from featup_adapters.integrations.detectron2 import add_featup_config
except ImportError:  # the clone without an install: its root is on sys.path (above)
    from integrations.detectron2 import add_featup_config


def build_sem_seg_train_aug(cfg) -> list:
    """Resize the shortest edge, optional category-area-constrained crop, random flip."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    augs.append(T.RandomFlip())
    return augs


def load_index_mask(path: str, dtype=int):
    """A mask PNG as stored (class indices), as ``np.ndarray[H, W]`` of ``dtype``.

    (detectron2's default loader passes ``copy=False`` to ``np.array``, which NumPy 2 rejects.)
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im, dtype=dtype)


class SemSegDatasetMapper:
    """Image + semantic mask -> the dict a SemanticSegmentor takes, with the augmentations applied.

    Unlike detectron2's DatasetMapper (which reads masks with ``convert("L")``, turning a VOC palette
    PNG into luminance values), the mask is read as stored: class indices of an index / palette PNG.
    """

    def __init__(self, cfg, is_train: bool = True):
        self.augs = T.AugmentationList(build_sem_seg_train_aug(cfg) if is_train else [
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")])
        self.image_format = cfg.INPUT.FORMAT
        self.is_train = is_train

    def __call__(self, dataset_dict: dict) -> dict:
        import copy

        import numpy as np
        import torch
        from PIL import Image
        from detectron2.data import detection_utils as utils

        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        sem_seg = None
        if "sem_seg_file_name" in d:
            with Image.open(d.pop("sem_seg_file_name")) as im:
                sem_seg = np.array(im).astype("double")
            if sem_seg.ndim != 2:
                raise ValueError(f"expected a single-channel index mask for {d['file_name']}, got shape {sem_seg.shape}")
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augs(aug_input)
        d["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if aug_input.sem_seg is not None:
            d["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        return d


class Trainer(DefaultTrainer):
    """DefaultTrainer with semantic-segmentation augmentation, evaluator and the poly LR schedule."""

    def build_writers(self):
        # detectron2's default writers, leaving out TensorBoard when it is not installed
        import importlib.util

        from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

        out = self.cfg.OUTPUT_DIR
        writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(out, "metrics.json"))]
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            writers.append(TensorboardXWriter(out))
        return writers

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "sem_seg")
        if evaluator_type not in ("sem_seg", "ade20k_panoptic_seg", "coco_panoptic_seg"):
            raise NotImplementedError(f"no semantic segmentation evaluator for {dataset_name!r} "
                                      f"(evaluator_type {evaluator_type!r})")
        return DatasetEvaluators([SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                                  sem_seg_loading_fn=load_index_mask)])

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SemSegDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # detectron2's schedulers plus DeepLab's WarmupPolyLR
        return build_lr_scheduler(cfg, optimizer)


def register_sem_seg_folder(spec: str, ignore_label: int = 255, num_classes: int | None = None) -> str:
    """Register ``NAME=IMAGE_DIR:MASK_DIR`` (VOC layout: ``a.jpg`` <-> ``a.png`` index masks) as a dataset."""
    from detectron2.data.datasets import load_sem_seg

    name, sep, dirs = spec.partition("=")
    image_dir, sep2, mask_dir = dirs.partition(":")
    if not (sep and sep2 and name and image_dir and mask_dir):
        raise ValueError(f"expected --register-sem-seg NAME=IMAGE_DIR:MASK_DIR, got {spec!r}")
    for d in (image_dir, mask_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"expected a directory for --register-sem-seg {name}, got {d!r}")
    exts = {os.path.splitext(f)[1].lstrip(".") for f in os.listdir(image_dir)} & {"jpg", "jpeg", "png"}
    image_ext = "jpg" if "jpg" in exts or not exts else sorted(exts)[0]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: load_sem_seg(mask_dir, image_dir, "png", image_ext))
        meta = dict(image_root=image_dir, sem_seg_root=mask_dir, evaluator_type="sem_seg", ignore_label=ignore_label)
        if num_classes:
            meta["stuff_classes"] = [str(i) for i in range(num_classes)]
        MetadataCatalog.get(name).set(**meta)
    return name


def setup(args):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_featup_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    for spec in args.register_sem_seg or []:
        register_sem_seg_folder(spec, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    parser.add_argument("--register-sem-seg", action="append", metavar="NAME=IMAGE_DIR:MASK_DIR",
                        help="register a VOC-style folder dataset (index-PNG masks, 255 = ignore); repeatable")
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
