# The data, schedule and LRPET hook of the toy mmdet configs (faster-rcnn_r50_fpn_lrpet_toy.py,
# retinanet_r50_fpn_lrpet_toy.py): mmdet's VOC 07+12 dataset settings and default runtime on the generated
# toy VOC set, 128 px images, 3 iterations on one CPU. Not a config of its own (it has no model).
# The dataset root (the folder holding VOCdevkit/) is read from the environment variable
# LRPET_TOY_VOC_ROOT and defaults to data/toy_voc (mmengine's `{{$VAR:default}}` substitution).
_base_ = ['mmdet::_base_/datasets/voc0712.py', 'mmdet::_base_/default_runtime.py']

custom_imports = dict(imports=['lrpet_dense.mmdet'], allow_failed_imports=False)

data_root = '{{$LRPET_TOY_VOC_ROOT:data/toy_voc}}/VOCdevkit/'
image_scale = (128, 128)
max_iters = 3

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,  # BN needs batch >= 2 in training
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        _delete_=True,
        type='VOCDataset',
        data_root=data_root,
        ann_file='VOC2007/ImageSets/Main/trainval.txt',
        data_prefix=dict(sub_data_root='VOC2007/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8, bbox_min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.005, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2, save_last=True),
    visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(by_epoch=False)
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
