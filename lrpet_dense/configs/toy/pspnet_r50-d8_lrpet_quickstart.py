# The quickstart's LRPET PSPNet R50-D8 (scripts/quickstart.sh): the toy config trained long enough,
# from random init on CPU, to learn the toy VOC set written by
#   python -m lrpet_dense.data.toy_voc OUT --train 64 --test 16 --size 96 --max-objects 2 --object-size 0.3 0.6 --noise 6
#   python <mmseg>/.mim/tools/train.py configs/toy/pspnet_r50-d8_lrpet_quickstart.py --work-dir OUT/seg
# Same ResNetV1c-50-D8 model and 64x64 crops as the toy config. 40 iterations (the 100 of earlier
# versions reached a higher mIoU; 40 stay far above chance, in 40% of the time): a smoke check that
# the pipeline learns, not a quality measure.
_base_ = './pspnet_r50-d8_lrpet_toy.py'

max_iters = 40
interval = 20  # LRPET projections after iterations 20 and 40

optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, begin=0, end=4, by_epoch=False),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=4, end=max_iters, by_epoch=False),
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
