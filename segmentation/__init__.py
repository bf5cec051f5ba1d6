"""Linear frozen segmentation in plain PyTorch, the protocol of the VICRegL paper.

``train.py`` is the script (``python segmentation/train.py --help``); ``datasets.py`` reads Pascal VOC,
ADE20K, Cityscapes and the built-in masks; ``transforms.py`` holds the joint image/mask augmentations;
``head.py`` the frozen feature extractor, the linear head and sliding-window inference; ``metrics.py``
the confusion matrix and mIoU. See README.md.
"""
