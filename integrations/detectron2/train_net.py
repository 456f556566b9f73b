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
    # run as a script: make `integrations.detectron2` importable and keep this folder off sys.path
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import detectron2.data.transforms as T  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler  # noqa: E402

from integrations.detectron2 import add_featup_config  # noqa: E402


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


class Trainer(DefaultTrainer):
    """DefaultTrainer with semantic-segmentation augmentation, evaluator and the poly LR schedule."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "sem_seg")
        if evaluator_type not in ("sem_seg", "ade20k_panoptic_seg", "coco_panoptic_seg"):
            raise NotImplementedError(f"no semantic segmentation evaluator for {dataset_name!r} "
                                      f"(evaluator_type {evaluator_type!r})")
        return DatasetEvaluators([SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)])

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
        return build_detection_train_loader(cfg, mapper=mapper)

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
