"""WebDataset shards (data.dataset=wds): `cvt shards` writes them from a tiny image folder, and the stream reads them
split across ranks and loader workers, resumes by (epoch, skip), and says clearly what is wrong with a bad shard."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cvt.cli import main
from cvt.data import Readers, UnreadableImageError, collate_skipping
from cvt.engine import Processes, build_data, load_config, training_config
from cvt.shards import INDEX_NAME, ShardError, shard_split, write_shards


def write_folder(root, classes: int = 4, per_class: int = 8, split: str | None = None):
    """8x8 PNGs whose first pixel says which image they are (red: its number, green: its class)."""
    base = root / split if split else root
    for number in range(classes * per_class):
        label = number % classes
        folder = base / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[..., 0], pixels[..., 1] = number, label
        Image.fromarray(pixels).save(folder / f"{number:03d}.png")
    return root


def identify(image) -> torch.Tensor:
    """The image's number, its class and a random draw (which shows which seed its augmentation ran under)."""
    red, green = np.asarray(image)[0, 0, :2]
    return torch.tensor([float(red), float(green), torch.rand(()).item()])


def data_cfg(root, *overrides):
    return load_config(None, ["data.dataset=wds", f"data.root={root}", *overrides])["data"]


def read_epoch(root, rank: int, world: int, workers: int, epoch: int, skip: int = 0, batch: int = 2, *overrides):
    """This rank's training batches of `epoch` (from its `skip`-th sample on), through a DataLoader."""
    stream, _ = shard_split(data_cfg(root, f"data.workers={workers}", *overrides), True, identify,
                            Readers(rank, world, batch, seed=0))
    stream.set_epoch(epoch, skip)
    loader = DataLoader(stream, batch, num_workers=workers, collate_fn=collate_skipping, drop_last=True)
    batches = [images for images, _, _ in loader]
    assert len(batches) == len(loader)
    return batches


@pytest.fixture
def shards(tmp_path):
    """32 training images of 4 classes in 8 shards of 4, and 4 held-out ones."""
    write_folder(tmp_path / "images", split="train")
    write_shards(write_folder(tmp_path / "images", per_class=1, split="val"), tmp_path / "shards", shard_size=4)
    return tmp_path / "shards"


@pytest.fixture
def unsplit_shards(tmp_path):
    """32 images of 4 classes in 8 shards of 4, without a held-out split."""
    write_shards(write_folder(tmp_path / "images"), tmp_path / "shards", shard_size=4)
    return tmp_path / "shards"


def test_two_ranks_of_two_workers_read_every_sample_once_an_epoch(shards):
    orders = []
    for epoch in (0, 1):
        per_rank = [torch.cat(read_epoch(shards, rank, 2, 2, epoch)) for rank in (0, 1)]
        assert [len(ids) for ids in per_rank] == [16, 16]  # the same number of steps on both ranks
        seen = torch.cat(per_rank)
        assert sorted(seen[:, 0].long().tolist()) == list(range(32))
        assert torch.equal(seen[:, 1], seen[:, 0] % 4)  # each sample has its own class
        orders.append(seen[:, 0].tolist())
    assert orders[0] != orders[1]  # reshuffled by the epoch


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path):
    write_folder(tmp_path / "images", classes=2, per_class=1, split="val")
    write_shards(write_folder(tmp_path / "images", classes=2, per_class=13, split="train"), tmp_path / "shards",
                 shard_size=4)
    for epoch in range(3):  # 7 shards (the last of 2) over 2 ranks: one rank's shards are short of its 12
        counts = [len(torch.cat(read_epoch(tmp_path / "shards", rank, 2, 0, epoch))) for rank in (0, 1)]
        assert counts == [12, 12]


def test_a_resumed_epoch_reads_and_augments_what_an_uninterrupted_one_does(shards):
    uninterrupted = read_epoch(shards, 0, 2, 2, epoch=1)
    # A fresh process at the epoch boundary, and from the 3rd micro-batch on (odd: the workers trade roles).
    assert all(torch.equal(a, b) for a, b in zip(read_epoch(shards, 0, 2, 2, epoch=1), uninterrupted))
    resumed = read_epoch(shards, 0, 2, 2, epoch=1, skip=3 * 2)
    assert len(resumed) == len(uninterrupted) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:]))


def test_the_engine_trains_from_shards_and_resumes_inside_an_epoch(shards):
    cfg = training_config(load_config(None, ["data.dataset=wds", f"data.root={shards}", "train.batch_size=4",
                                             "data.img_size=16"]))
    data = build_data(cfg, Processes(0, 1, torch.device("cpu"), False))
    assert data.steps_per_epoch == 8 and len(data.val_set) == 4
    data.start_epoch(2)
    whole = [images for images, _, _ in data.train_loader]
    data.start_epoch(2, skip=5)  # micro-batches
    resumed = [images for images, _, _ in data.train_loader]
    assert len(whole) == 8 and whole[0].shape == (4, 3, 16, 16) and len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[5:]))
    assert sum(len(images) for images, _, _ in data.val_loader) == 4


def test_the_held_out_share_of_shards_without_a_val_split(unsplit_shards):
    cfg = data_cfg(unsplit_shards, "data.val_fraction=0.25")
    parts = {}
    for train in (True, False):
        stream, classes = shard_split(cfg, train, identify, Readers())
        parts[train] = torch.stack([x for x, _ in stream])
    assert classes == [f"class_{c}" for c in range(4)]
    train_ids, val_ids = (set(parts[t][:, 0].long().tolist()) for t in (True, False))
    assert len(val_ids) == 8 and not train_ids & val_ids and train_ids | val_ids == set(range(32))
    assert sorted(parts[False][:, 1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # stratified: 2 of each class
    again, _ = shard_split(cfg, False, identify, Readers())
    assert {int(x[0]) for x, _ in again} == val_ids  # fixed


def test_cvt_shards_writes_checks_and_refuses_to_overwrite(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", split="train")
    write_folder(tmp_path / "images", per_class=1, split="val")
    out = tmp_path / "shards"
    main(["shards", str(folder), "--output", str(out), "--shard-size", "5"])
    printed = capsys.readouterr().out
    assert "32 train images in 7 shards, 4 val images in 1 shards, 4 classes" in printed and "read back" in printed
    assert sorted(p.name for p in out.iterdir()) == [INDEX_NAME] + [f"train-{i:06d}.tar" for i in range(7)] + [
        "val-000000.tar"]  # no temporary files left
    index = json.loads((out / INDEX_NAME).read_text())
    assert [len(e["labels"]) for e in index["splits"]["train"]] == [5] * 6 + [2]
    with pytest.raises(SystemExit):
        main(["shards", str(folder), "--output", str(out)])
    assert "already holds shards" in capsys.readouterr().err


def truncate(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2 + 100])


def without_labels(shard):
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".cls")]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("damage, message", [
    (lambda shard: shard.write_bytes(b"not a tar file at all" * 100), r"cannot be read .*not a tar file"),
    (truncate, r"truncated"),
    (without_labels, r"not an image \(.jpg, .png, ...\) and its class index as text \(.cls\)"),
    (lambda shard: shard.unlink(), r"lists shards that are not there"),
], ids=["not a tar", "truncated", "no labels", "missing"])
def test_a_bad_shard_is_one_clear_line_naming_it(shards, damage, message):
    shard = shards / "train-000003.tar"
    damage(shard)
    with pytest.raises((ShardError, FileNotFoundError), match=message) as error:
        list(shard_split(data_cfg(shards), True, identify, Readers())[0])
    assert str(shard) in str(error.value) and "cvt shards" in str(error.value) and "\n" not in str(error.value)


def test_an_index_that_is_not_the_shards_and_repeated_augmentation_are_errors(shards):
    index = json.loads((shards / INDEX_NAME).read_text())
    index["splits"]["train"][0]["labels"][0] = (index["splits"]["train"][0]["labels"][0] + 1) % 4
    (shards / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"train-000000.tar is of class .* the index is not this shard's"):
        list(shard_split(data_cfg(shards), True, identify, Readers())[0])
    with pytest.raises(ValueError, match="data.repeated_aug needs a map-style set"):
        shard_split(data_cfg(shards, "data.repeated_aug=3"), True, identify, Readers())
    (shards / INDEX_NAME).write_text("{")
    with pytest.raises(ShardError, match="is not a readable shard index"):
        shard_split(data_cfg(shards), True, identify, Readers())


def test_unreadable_images_in_shards_are_skipped_and_counted_or_named(tmp_path):
    folder = write_folder(tmp_path / "images", classes=2, per_class=4)
    (folder / "class_1" / "broken.png").write_bytes(b"this is not a PNG")
    write_shards(folder, tmp_path / "shards", shard_size=9)
    stream, _ = shard_split(data_cfg(tmp_path / "shards", "data.bad_images=skip"), False, identify, Readers())
    skipped = sum(s for _, _, s in DataLoader(stream, 4, collate_fn=collate_skipping))
    assert skipped == 1
    stream, _ = shard_split(data_cfg(tmp_path / "shards"), False, identify, Readers())
    with pytest.raises(UnreadableImageError, match=r"class_1/broken.png \(sample \d+ of shard .*data.bad_images=skip"):
        list(stream)
