"""Self-supervised pretraining of the ResNet34 trunk on unlabeled slides (``wsilocal pretrain``).

Data flow: slide files → tissue tiles sampled at random (:mod:`.tiles`, read at the target MPP, never written
to disk) → two augmented views per tile (:mod:`.augment`: crops, flips, 90° rotations, H&E stain jitter, colour
jitter, blur) → a trainable torchvision-layout ResNet34 (conv1 stride 2, ordinary BatchNorm) + projector →
a contrastive or variance-invariance-covariance loss (:mod:`.objectives`) → ``resnet34.safetensors``
(:mod:`.trainer`), which ``--weights`` feeds to our whole-slide trunk, StreamingCNN and the MIL feature extractor.
"""
