"""Image folder -> decoded RGB -> backbone-sized tensors -> Lightning batches."""

from .cache import DecodedImageCache
from .datamodule import ImageFolderDataModule, ImageFolderDataset, collate_skipping, default_num_workers
from .folders import DatasetSplits, Sample, scan_image_folder
from .images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from .transforms import ResizeCenterCrop, build_transforms, parse_data_config

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSplits",
    "DecodedImageCache",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ResizeCenterCrop",
    "Sample",
    "build_transforms",
    "collate_skipping",
    "default_num_workers",
    "is_image_file",
    "load_rgb",
    "parse_data_config",
    "scan_image_folder",
]
