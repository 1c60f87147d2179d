# Tiny LRPET Faster R-CNN R50-FPN as a detectron2 LazyConfig, on a generated toy VOC set (tests, docs):
#   python -m lrpet_dense.data.toy_voc /tmp/toyvoc --train 16 --test 8 --size 128
#   LRPET_TOY_VOC=/tmp/toyvoc/VOCdevkit python examples/detectron2_lazyconfig_train.py \
#       --config-file $(lrpet-dense config-path toy/faster_rcnn_fpn_lrpet_lazy.py)
# detectron2's common/models/mask_rcnn_fpn.py with the mask head off (Faster R-CNN), BN instead of
# FrozenBN, torchvision-style ResNet (stride in the 3x3) and pixel std, so random init stays finite;
# few proposals and ROIs, 128 px images. The LRPET options are `lrpet` (LRPETConfig's fields).
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader, \
    get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None, num_classes=20,
                       batch_size_per_image=32)
model.backbone.bottom_up.stem.norm = "BN"
model.backbone.bottom_up.stages.norm = "BN"
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.pixel_std = [57.375, 57.120, 58.395]
model.proposal_generator.update(pre_nms_topk=(256, 256), post_nms_topk=(64, 64))

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="voc_toy_2007_trainval"),
        mapper=L(DatasetMapper)(is_train=True, image_format="BGR",
                                augmentations=[L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=213,
                                                                      sample_style="choice")]),
        total_batch_size=2, num_workers=0),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="voc_toy_2007_test", filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, image_format="BGR",
                                augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=213)]),
        num_workers=0),
    evaluator=L(PascalVOCDetectionEvaluator)(dataset_name="voc_toy_2007_test"),
)

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.001
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates="${train.max_iter}"),
    warmup_length=0.25, warmup_factor=0.001)

train = model_zoo.get_config("common/train.py").train
train.update(output_dir="./output/toy_fpn_lrpet_lazy", init_checkpoint="", max_iter=20, eval_period=0,
             device="cpu", seed=0, log_period=5, checkpointer=dict(period=10, max_to_keep=100))

# LRPETConfig's fields (docs/detectron2.md): the LRPET options of this run.
# BN statistics recomputed on 2 training batches after the last projection (the default, 200, is for real runs).
lrpet = dict(ratio=0.5, interval=5, plan_input_size=(128, 128), precise_bn_iters=2)
