# The quickstart's LRPET Faster R-CNN R50-FPN in mmdet (a candidate third model of scripts/quickstart.sh):
# the toy config trained long enough, from random init on CPU, to learn the toy VOC set written by
#   python -m lrpet_dense.data.toy_voc OUT --train 64 --test 16 --size 128 --max-objects 2 --object-size 0.3 0.6 --noise 6
#   python <mmdet>/.mim/tools/train.py configs/toy/faster-rcnn_r50_fpn_lrpet_quickstart.py --work-dir OUT/mmdet
# Same model, 128 px images and data settings as the toy config, with mmdet's usual RPN sampling (256 anchors,
# half positive: the toy config samples every anchor, for an exact resume, which drowns the few positives).
_base_ = './faster-rcnn_r50_fpn_lrpet_toy.py'

model = dict(train_cfg=dict(rpn=dict(sampler=dict(num=256))))

max_iters = 100
interval = 25  # LRPET projections after iterations 25, 50, 75 and 100

optim_wrapper = dict(optimizer=dict(lr=0.02))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, begin=0, end=10, by_epoch=False),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=10, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, save_last=True))
custom_hooks = [
    dict(
        type='LRPETHook',
        ratio=0.5,  # rank pruning ratio p: k = floor(m * 0.5)
        include=['backbone.*'],
        interval=interval,
        energy_transfer=True,
        bn_rectification=True,
        precise_bn_iters=10),  # BN statistics recomputed on 10 training batches after the last projection
]
