"""The Fashion-MNIST world (`search_spaces/tiny_fashion.yaml`, `soup demo --world fashion`).

The data set itself is read by the torchvision adapter (`tvsets`, ``source: FashionMNIST``), which
finds the official files installed by Debian's ``dataset-fashion-mnist`` or downloads them. This
module holds what the world adds: the names its prompts and captions use, and how the 60,000
images of the official train split are shared between the world's base and its task:

- ``WEB`` (the second half) is the base's "web" data: images with captions it was pretrained on
  contrastively beside the glyphs (`train.pretrain.pretrain_fashion`), as CLIP's pretraining has
  seen the concepts of the tasks it is fine-tuned on;
- ``TASK`` (the first half) is the task's: held-out is carved from it and the fine-tunes train on a
  subset of the rest (``data.train_range``, ``data.train_size``). The two never meet, whatever
  the split seed. The official 10,000 test images are the test split and the shifts' source.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import DataConfig

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "tiny_fashion.yaml"
SOURCE = "FashionMNIST"
CLASSNAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
              "ankle boot")  # torchvision's names, as a caption would say them ("T-shirt/top", ...)
TASK = (0, 30_000)
WEB = (30_000, 60_000)
# Web captions are rarely precise: most of the web slice is captioned by kind only ("a photo of a
# shoe"), a few images by name ("a photo of a sneaker"), so the base knows the garments' names
# without having been taught to tell a shirt from a t-shirt (the fine-tunes' work).
KINDS = {"top": ("t-shirt", "pullover", "coat", "shirt"), "shoe": ("sandal", "sneaker", "ankle boot"),
         "trouser": ("trouser",), "dress": ("dress",), "bag": ("bag",)}
KIND_TEMPLATES = ("a photo of a {}.", "a {} for sale.", "a picture of a {}, an item of clothing.")
TEMPLATES = ("a photo of a {}.", "a low resolution photo of a {}.", "a black and white photo of a {}.",
             "a photo of the {}, a type of clothing.", "a {} on a plain background.", "a picture of a {}.")


def web_config(root: str | None = None) -> DataConfig:
    """The data config of the base's web slice: train images ``WEB`` (the pretraining reads its
    train and held-out splits, both carved from that slice, and nothing else)."""
    return DataConfig(dataset="torchvision", source=SOURCE, root=root, image_size=32, train_range=WEB,
                      classnames=CLASSNAMES, shifts=())


def missing(space: Path = SPACE) -> str | None:
    """None when the world's data can be read (Debian's files are copied where torchvision looks,
    or torchvision downloads them where the space allows it), else why not, in one line."""
    from orchestrator.config import SearchSpace, load_yaml
    from orchestrator.data import tvsets

    try:
        tvsets.find(load_yaml(SearchSpace, space).base.data)
    except ValueError as err:
        return (f"Fashion-MNIST is not on this machine (no Debian package dataset-fashion-mnist under "
                f"{tvsets.DEBIAN_DATASETS}) and {err}")
    return None
