# PSPNet R50-D8 on VOC12 + SBD (aug), 512x512, 20k iterations, trained with LRPET for a 30% cut of
# the backbone's conv MACs (paper: 76.48 -> 76.33 mIoU). Train with mmseg's own tools/train.py:
#   python tools/train.py configs/pspnet_r50-d8_lrpet_voc12aug-512x512.py
# then factorise with tools/compress_seg.py.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'

custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)

# An EncoderDecoder that also loads compressed (factorised) checkpoints; dense, it is identical.
model = dict(type='LRPETEncoderDecoder')

custom_hooks = [
    dict(
        type='LRPETHook',
        target_macs_cut=0.3,  # 30% of the backbone's conv MACs (solves the one ratio p, ~0.43)
        include=['backbone.*'],  # every conv of ResNetV1c: deep stem, blocks, downsample
        exclude=[],
        interval=500,  # project every 500 iterations (paper, ImageNet) and after the last one
        begin=0,
        energy_transfer=True,
        bn_rectification=True,
        ridge=1e-5,
        residual=0.0,
        rank_warmup=0,  # the plan's ranks from the first projection (the paper's)
        precise_bn_iters=200),  # BN statistics recomputed on 200 training batches after the last projection
]
