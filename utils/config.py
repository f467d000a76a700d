"""The project's facts: class folders, image size, paths and file names, the download, size limits.

Every script reads them from here, so training and prediction never disagree on them."""

from pathlib import Path

# The Microsoft archive's class folders (any case) -> (folder in the split, the class's name). Any other
# source's classes are its sub-folders' names; prepare_data.py writes them to report.json, train.py reads
# them from there and puts them inside both model files, and predict.py reads them from the model.
MICROSOFT_CLASSES = {"cat": ("cats", "cat"), "dog": ("dogs", "dog")}
MICROSOFT_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 160  # pixels per side of the finished model (train.py --image-size)
# Filters of the network's four blocks (train.py --width scales them): airbench's layout, fewer where the
# maps are large (the first block, at 80 x 80 on 160 px photos), so its epochs cost less (benchmarks/speedrun.md)
WIDTHS = (16, 64, 128, 256)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

DATA_DIR = Path("data/processed")  # the split prepare_data.py writes and train.py reads
DOWNLOAD_DIR = Path("data/downloads")  # where prepare_data.py keeps the zips it downloads
MODEL_DIR = Path("models")
MODEL_FILE = "cats_vs_dogs.keras"
LITERT_FILE = "cats_vs_dogs.tflite"  # the same model for LiteRT: predict.py without TensorFlow
OTHER_MODEL_STEM = "model"  # model.keras and model.tflite: the files of any class set other than cat, dog
LABELS_FILE = "labels.txt"  # class names, one a line in output order: beside the models, and inside the .tflite

# A picture of more pixels than this is refused, not decoded (decompression bombs);
# 10,000 x 10,000 photos still pass, and JPEGs that large decode at reduced scale.
MAX_PIXELS = 120_000_000
# A source file larger than this is dropped unread (no real photo comes near; a zip bomb does),
# so reading a hostile archive never needs more memory than this per worker.
MAX_FILE_BYTES = 64 * 2**20
