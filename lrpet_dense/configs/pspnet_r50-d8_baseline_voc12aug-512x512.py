# The dense baseline the LRPET config is compared against: mmseg's config, unchanged except for the
# model type, so its checkpoints and the LRPET run's share one loader. Its checkpoints are stock
# mmengine checkpoints; importing lrpet_dense.mmseg lets torch's weights_only loader read them.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'

custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
model = dict(type='LRPETEncoderDecoder')
