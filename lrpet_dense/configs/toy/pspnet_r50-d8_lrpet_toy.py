# A tiny LRPET run of PSPNet R50-D8 for tests and the quickstart (CPU, minutes):
#   python -m lrpet_dense.data.toy_voc data/toy_voc --train 8 --test 4 --size 96
#   python <mmseg>/.mim/tools/train.py configs/toy/pspnet_r50-d8_lrpet_toy.py --work-dir work_dirs/toy
# The dataset root (the folder holding VOCdevkit/) is read from the environment variable
# LRPET_TOY_VOC_ROOT and defaults to data/toy_voc (mmengine's `{{$VAR:default}}` substitution).

_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'

custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)

data_root = '{{$LRPET_TOY_VOC_ROOT:data/toy_voc}}/VOCdevkit/VOC2012'
crop_size = (64, 64)
max_iters = 3

# One CPU process: BN instead of SyncBN. No pretrained weights (no network). No dropout, so a
# resumed run replays the uninterrupted one exactly.
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='LRPETEncoderDecoder',
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg, dropout_ratio=0.0),
    auxiliary_head=dict(norm_cfg=norm_cfg, dropout_ratio=0.0))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,  # BN needs batch >= 2 in training
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        _delete_=True,
        type='PascalVOCDataset',
        data_root=data_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/train.txt',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.005))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2, save_last=True))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)

custom_hooks = [
    dict(
        type='LRPETHook',
        ratio=0.5,  # rank pruning ratio p: k = floor(m * 0.5)
        include=['backbone.*'],
        interval=2,  # projections after iteration 2 and after the last (3)
        energy_transfer=True,
        bn_rectification=True,
        precise_bn_iters=2),  # BN statistics recomputed on 2 training batches after the last projection
]
