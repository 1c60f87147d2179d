# RetinaNet R50-FPN on PASCAL VOC 07+12 (mmdet's own dataset settings and 4 x 3-repeat epochs),
# trained with LRPET for a 30% cut of the backbone's conv MACs. Train and evaluate with mmdet's own tools:
#   python <mmdet>/.mim/tools/train.py "$(lrpet-dense config-path retinanet_r50_fpn_lrpet_voc0712.py)"
#   lrpet-dense compress det-mm CONFIG work_dirs/.../epoch_4.pth compressed.pth
#   python <mmdet>/.mim/tools/test.py CONFIG compressed.pth
# The data root is mmdet's default, data/VOCdevkit/ (change data_root and the dataloaders' data_root).
_base_ = 'mmdet::pascal_voc/retinanet_r50_fpn_1x_voc0712.py'

custom_imports = dict(imports=['lrpet_dense.mmdet'], allow_failed_imports=False)

# A RetinaNet that also loads compressed (factorised) checkpoints; dense, it is identical. Keep it in
# every config that loads compressed checkpoints (mmdet.apis.init_detector, tools/test.py): a stock
# RetinaNet built without lrpet_dense imported would get no weights for the factorised convs.
model = dict(type='LRPETRetinaNet')

custom_hooks = [
    dict(
        type='LRPETHook',
        target_macs_cut=0.3,  # 30% of the backbone's conv MACs (solves the one ratio p)
        include=['backbone.*'],  # the backbone's trained convs (frozen_stages=1 leaves the stem and layer1 out)
        interval=500,  # project every 500 iterations and after the last one
        energy_transfer=True,
        bn_rectification=True),
]
