# A tiny LRPET run of mmdet's RetinaNet R50-FPN for tests (CPU, under a minute):
#   python -m lrpet_dense.data.toy_voc data/toy_voc --train 6 --test 3 --size 128
#   python <mmdet>/.mim/tools/train.py configs/toy/retinanet_r50_fpn_lrpet_toy.py --work-dir work_dirs/toy_retina
# mmdet's VOC 07+12 RetinaNet (the parts of pascal_voc/retinanet_r50_fpn_1x_voc0712.py) on the toy data
# and schedule of det_toy_runtime.py, made trainable from random init on one CPU: BN that trains, no
# pretrained weights, fewer candidate boxes.
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './det_toy_runtime.py']

model = dict(
    type='LRPETRetinaNet',  # a RetinaNet that also loads compressed checkpoints; dense, it is identical
    backbone=dict(frozen_stages=-1, norm_eval=False, init_cfg=None),
    bbox_head=dict(num_classes=20),
    test_cfg=dict(nms_pre=200, score_thr=0.0))
