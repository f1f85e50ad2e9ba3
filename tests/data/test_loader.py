"""Folder splits stay uint8 through the loader and become float in [0, 1] on the device."""

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from orchestrator.config import DataConfig
from orchestrator.data import imagenet, splits
from orchestrator.train import evaluate
from orchestrator.train.accel import CPU, Accel, images_on

SIZE = 12
IDX = (1, 6, 11)  # ImageNet-1k classes that are also ImageNet-R classes


def write_noise(folder, n: int, seed: int) -> None:
    """Noisy JPEGs of odd shapes: resize and crop change every pixel, unlike flat colours."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        h, w = (20, 30) if k % 2 else (31, 17)
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"img_{k}.JPEG")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for j, i in enumerate(IDX):
        wnid = imagenet.imagenet_wnids()[i]
        write_noise(root / "imagenet" / "train" / wnid, 4, seed=j)
        write_noise(root / "imagenet" / "val" / wnid, 3, seed=10 + j)
        write_noise(root / "imagenet-r" / wnid, 2, seed=20 + j)
    cfg = DataConfig(dataset="imagenet", root=str(root), image_size=SIZE, heldout_fraction=0.25,
                     shifts=("imagenet_r",))
    return imagenet.load_imagenet_task(cfg)


def as_tensor_split(split: splits.FolderSplit) -> splits.TensorSplit:
    """The same images held in memory as floats, converted independently of the code under test."""
    images = torch.stack([split.dataset[i][0] for i in range(len(split))]).float() / 255
    return splits.TensorSplit(split.name, images, split.labels, split.project)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, len(IDX)))


def check_uint8(image: torch.Tensor, index: int) -> torch.Tensor:
    """An augmentation that insists on uint8 (module level: loader workers may pickle it)."""
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE), (image.dtype, index)
    return image.flip(-1)


RANDAUG = v2.RandAugment(num_ops=2, magnitude=9)


def randaugment(image: torch.Tensor, index: int) -> torch.Tensor:
    torch.manual_seed(index)  # seeded by the image, as a real augmentation would be
    return RANDAUG(image)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_are_uint8(task, workers):
    opts = splits.LoaderOptions(workers=workers)
    got = list(task.train.batches(5, opts=opts))
    x = torch.cat([b[0] for b in got])
    assert x.dtype == torch.uint8 and x.shape == (len(task.train), 3, SIZE, SIZE)
    assert torch.equal(x[0], task.train.dataset[0][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_runs_on_uint8_in_the_workers(task, workers):
    opts = splits.LoaderOptions(workers=workers)
    x = torch.cat([b[0] for b in task.test.batches(4, augment=check_uint8, opts=opts)])
    plain = torch.cat([b[0] for b in task.test.batches(4)])
    assert x.dtype == torch.uint8 and torch.equal(x, plain.flip(-1))
    aug = torch.cat([b[0] for b in task.test.batches(4, augment=randaugment, opts=opts)])
    again = torch.cat([b[0] for b in task.test.batches(4, augment=randaugment)])
    assert aug.dtype == torch.uint8 and torch.equal(aug, again) and not torch.equal(aug, plain)


def test_to_device_converts_uint8_to_float_in_unit_range():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = CPU.to_device(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255)
    assert out.min() >= 0 and out.max() <= 1
    floats = torch.rand(2, 3, 5, 5)
    assert torch.equal(CPU.to_device(floats), floats)  # in-memory splits pass through unchanged
    assert torch.equal(images_on(x, torch.device("cpu")), x.float() / 255)


def test_to_device_channels_last_after_conversion():
    accel = Accel(torch.device("cpu"), "fp32", True, splits.LoaderOptions())
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = accel.to_device(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, x.float() / 255)


@pytest.mark.parametrize("name", ["test", "imagenet_r"])  # imagenet_r: projected logits
def test_logits_and_accuracy_match_a_tensor_split(task, name):
    folder = task.reporting()[name]
    tensor, m = as_tensor_split(folder), model()
    got, want = evaluate.logits(m, folder, batch_size=4), evaluate.logits(m, tensor, batch_size=4)
    assert got.shape == (len(folder), len(IDX)) and torch.equal(got, want)
    assert evaluate.accuracy(m, folder, 4) == evaluate.accuracy(m, tensor, 4)


def test_heldout_counter_matches_a_tensor_split(task):
    folder = task.heldout
    tensor, m = as_tensor_split(folder), model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    got = list(evaluate.heldout_counter(m, folder, chunk_size=2).correct(state))
    want = list(evaluate.heldout_counter(m, tensor, chunk_size=2).correct(state))
    assert got == want and sum(n for _, n in got) == len(folder)
