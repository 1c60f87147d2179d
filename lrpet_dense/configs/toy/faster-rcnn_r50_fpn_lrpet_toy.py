# A tiny LRPET run of mmdet's Faster R-CNN R50-FPN for tests and the quickstart (CPU, under a minute):
#   python -m lrpet_dense.data.toy_voc data/toy_voc --train 6 --test 3 --size 128
#   python <mmdet>/.mim/tools/train.py configs/toy/faster-rcnn_r50_fpn_lrpet_toy.py --work-dir work_dirs/toy_det
# mmdet's VOC 07+12 Faster R-CNN (the parts of pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py) on the toy
# data and schedule of det_toy_runtime.py, made trainable from random init on one CPU: BN that trains
# (no frozen stage, no norm_eval: there are no pretrained statistics), no pretrained weights, smaller
# anchors for 128 px images, few proposals. Every anchor and every proposal is a training sample (the
# samplers draw nothing at random), so a resumed run replays the uninterrupted one exactly.
_base_ = ['mmdet::_base_/models/faster-rcnn_r50_fpn.py', './det_toy_runtime.py']

model = dict(
    type='LRPETFasterRCNN',  # a FasterRCNN that also loads compressed checkpoints; dense, it is identical
    backbone=dict(frozen_stages=-1, norm_eval=False, init_cfg=None),
    rpn_head=dict(anchor_generator=dict(scales=[4])),
    roi_head=dict(bbox_head=dict(num_classes=20)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=8192)),  # > the 4092 anchors of a 128 px image
        rpn_proposal=dict(nms_pre=200, max_per_img=32),
        rcnn=dict(sampler=dict(num=512))),  # > the 32 proposals + ground truths
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=32), rcnn=dict(score_thr=0.0)))
