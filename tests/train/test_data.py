"""Dataset formats, validation and safe extraction (no models needed)."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from styleinject.train.data import (
    DatasetError,
    EpochSampler,
    ImageTextDataset,
    inspect_dataset,
    load_dataset,
    safe_extract,
)
from tests.train.helpers import (
    image_folder,
    metadata_folder,
    png_bytes,
    snapshot,
    tar_folder,
    tar_member,
    tar_with,
    zip_folder,
    zip_with,
)

# -- formats ----------------------------------------------------------------------------------


def test_folder_zip_and_tar_read_alike(tmp_path):
    folder = image_folder(tmp_path / "set", n=3)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.jpg").write_bytes(png_bytes(9))  # extension lies, content decodes
    (folder / "sub" / "deep.txt").write_text("nested caption")
    (folder / ".DS_Store").write_bytes(b"junk")  # OS clutter is ignored
    infos = [inspect_dataset(folder),
             inspect_dataset(zip_folder(folder, tmp_path / "set.zip")),
             inspect_dataset(tar_folder(folder, tmp_path / "set.tar.gz"))]
    assert [i.format for i in infos] == ["folder", "zip", "tar"]
    assert {i.num_items for i in infos} == {4}
    assert len({i.sha256 for i in infos}) == 1  # content hash, independent of the container
    (folder / "img0.txt").write_text("another caption")
    assert inspect_dataset(folder).sha256 != infos[0].sha256


def test_metadata_jsonl_with_teacher_text(tmp_path):
    root = metadata_folder(tmp_path / "m", n=2, teacher=True)
    loaded = load_dataset(root / "metadata.jsonl", "distill")
    assert loaded.info.layout == "metadata" and loaded.info.has_teacher_text
    assert [(i.text, i.teacher_text) for i in loaded.items] == [("ein Foto 0", "a photo 0"),
                                                                ("ein Foto 1", "a photo 1")]


def test_prompts_only_files_are_for_distill(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\n\na dog\n")
    info = inspect_dataset(txt, kind="distill")
    assert (info.format, info.num_items, info.has_teacher_text) == ("prompts", 2, False)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"text": "eine Katze", "teacher_text": "a cat"}) + "\n")
    assert inspect_dataset(jsonl, kind="distill").has_teacher_text
    with pytest.raises(DatasetError, match="prompts.txt: a prompts-only file works for distill only"):
        inspect_dataset(txt, kind="finetune")


def test_dreambooth_needs_no_captions(tmp_path):
    folder = image_folder(tmp_path / "inst", n=2, captions=False)
    assert inspect_dataset(folder, kind="dreambooth").num_items == 2
    with pytest.raises(DatasetError, match="img0.png: no caption"):
        inspect_dataset(folder, kind="finetune")


def test_skip_bad_counts_and_continues(tmp_path):
    folder = image_folder(tmp_path / "set", n=3)
    (folder / "img1.txt").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("x")
    info = inspect_dataset(folder, skip_bad=True)
    assert info.num_items == 2 and info.num_skipped == 2
    assert any("img1.png" in s for s in info.skipped) and any("broken.png" in s for s in info.skipped)


def test_images_are_resized_cropped_and_flipped(tmp_path):
    path = tmp_path / "wide.png"
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255  # left half white
    Image.fromarray(arr).save(path)
    from styleinject.train.data import Item

    ds = ImageTextDataset([Item("wide.png", path, "t")], 32, center_crop=True, random_flip=False)
    x = ds.get(0, 0)["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 0].mean() > 0.9 and x[:, :, -1].mean() < -0.9  # centre crop keeps the split
    flip = ImageTextDataset([Item("wide.png", path, "t")], 32, random_flip=True)
    flips = {bool(flip.get(0, seed)["pixel_values"][0, 0, 0] < 0) for seed in range(20)}
    assert flips == {True, False}


def test_epoch_sampler_resumes_exactly():
    a = EpochSampler(5, seed=3)
    first = a.next(7)
    state = a.state_dict()
    rest = a.next(9)
    b = EpochSampler(5, seed=3)
    b.load_state_dict(state)
    assert b.next(9) == rest
    assert sorted(i for i, _ in first[:5]) == list(range(5))  # each epoch is a permutation
    assert EpochSampler(5, seed=4).next(7) != first


# -- safe extraction --------------------------------------------------------------------------


def test_safe_extract_refuses_traversal_and_leaves_nothing(tmp_path):
    archive = zip_with(tmp_path / "evil.zip", {"ok.png": png_bytes(0), "../escaped.txt": b"x"})
    dest = tmp_path / "x" / "dest"
    with pytest.raises(DatasetError, match=r"evil.zip: member '\.\./escaped.txt' .*path traversal"):
        safe_extract(archive, dest)
    assert not dest.exists() and not (tmp_path / "x" / "escaped.txt").exists()


@pytest.mark.parametrize("name", ["/abs/a.png", "C:/win/a.png"])
def test_safe_extract_refuses_absolute_paths(tmp_path, name):
    archive = zip_with(tmp_path / "abs.zip", {name: b"x"})
    with pytest.raises(DatasetError, match="absolute path"):
        safe_extract(archive, tmp_path / "dest")


def test_safe_extract_refuses_links_and_devices(tmp_path):
    cases = {
        "zip-symlink": zip_with(tmp_path / "l.zip", {"link.png": b"/etc/passwd"}, {"link.png": 0o120777}),
        "tar-symlink": tar_with(tmp_path / "s.tgz", [tar_member("link.png", tarfile.SYMTYPE, "/etc/passwd")]),
        "tar-hardlink": tar_with(tmp_path / "h.tgz",
                                 [tar_member("a.png"), tar_member("b.png", tarfile.LNKTYPE, "a.png")],
                                 {"a.png": png_bytes(0)}),
        "tar-device": tar_with(tmp_path / "d.tgz", [tar_member("dev", tarfile.CHRTYPE)]),
        "tar-fifo": tar_with(tmp_path / "f.tgz", [tar_member("pipe", tarfile.FIFOTYPE)]),
    }
    expected = {"zip-symlink": "symbolic link", "tar-symlink": "symbolic link", "tar-hardlink": "hard link",
                "tar-device": "device file", "tar-fifo": "device file or FIFO"}
    for case, archive in cases.items():
        dest = tmp_path / f"dest-{case}"
        with pytest.raises(DatasetError, match=expected[case]):
            safe_extract(archive, dest)
        assert not dest.exists(), case


def test_safe_extract_caps_size_and_count(tmp_path):
    bomb = zip_with(tmp_path / "bomb.zip", {"zeros.png": b"\0" * (2 << 20)})
    assert bomb.stat().st_size < 20_000  # small on disk, 2 MiB unpacked
    with pytest.raises(DatasetError, match="expands to 2.0 MiB, more than the limit of 1.0 MiB"):
        safe_extract(bomb, tmp_path / "d1", max_bytes=1 << 20)
    many = zip_with(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(5)})
    with pytest.raises(DatasetError, match="more than 3 entries"):
        safe_extract(many, tmp_path / "d2", max_files=3)
    tgz = tar_with(tmp_path / "bomb.tgz", [tar_member("zeros.png")], {"zeros.png": b"\0" * (2 << 20)})
    with pytest.raises(DatasetError, match="more than the limit"):
        safe_extract(tgz, tmp_path / "d3", max_bytes=1 << 20)
    for d in ("d1", "d2", "d3"):
        assert not (tmp_path / d).exists()


def test_safe_extract_counts_actual_bytes_when_headers_lie(tmp_path):
    archive = zip_with(tmp_path / "lie.zip", {"big.png": b"\1" * 50_000})
    raw = bytearray(archive.read_bytes())
    # declare 10 bytes in both the local and the central header: the real data is bigger
    local = raw.index(b"PK\x03\x04")
    raw[local + 22:local + 26] = (10).to_bytes(4, "little")
    central = raw.index(b"PK\x01\x02")
    raw[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="lie.zip: member 'big.png'"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_pil_decompression_bomb_guard(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "set", n=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels: over 2x the limit
    with pytest.raises(DatasetError, match="img0.png: image is too large to decode safely"):
        inspect_dataset(folder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: PIL only warns
    with pytest.raises(DatasetError, match="too large"):
        inspect_dataset(folder)


# -- the malformed-dataset corpus, through the training entry point ---------------------------


def _corpus(root: Path) -> dict[str, tuple[Path, str, dict]]:
    """name -> (dataset path, expected message, extra TrainConfig fields)."""
    out = {}
    d = image_folder(root / "missing-caption", n=2)
    (d / "img1.txt").unlink()
    out["missing caption"] = (d, r"img1.png: no caption \(expected img1.txt next to it\)", {})
    d = image_folder(root / "corrupt", n=2)
    (d / "img0.png").write_bytes(png_bytes(0)[:60])  # truncated PNG
    out["corrupt image"] = (d, r"img0.png: cannot decode image", {})
    empty = root / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    out["empty archive"] = (empty, r"empty.zip: archive is empty", {})
    out["path traversal"] = (zip_with(root / "traversal.zip", {"a.png": png_bytes(0), "a.txt": b"cap",
                                                              "../../pwned.txt": b"x"}),
                             r"traversal.zip: member '../../pwned.txt' .*path traversal", {})
    out["symlink"] = (tar_with(root / "symlink.tar.gz", [tar_member("a.png"), tar_member("a.txt"),
                                                         tar_member("b.png", tarfile.SYMTYPE, "/etc/passwd")],
                               {"a.png": png_bytes(0), "a.txt": b"cap"}),
                      r"symlink.tar.gz: member 'b.png' is a symbolic link", {})
    d = image_folder(root / "non-image", n=1)
    (d / "notes.pdf").write_bytes(b"%PDF-1.4")
    out["non-image file"] = (d, r"notes.pdf: not an image or caption file", {})
    big = image_folder(root / "big-src", n=1)
    (big / "img0.png").write_bytes(png_bytes(0, size=256))
    out["too-large archive"] = (zip_folder(big, root / "big.zip"),
                                r"big.zip: archive expands to .* more than the limit", {"max_dataset_bytes": 1000})
    return out


def test_malformed_datasets_fail_clearly_and_write_nothing_outside(tmp_path, make_cfg):
    from styleinject.train import run_training

    corpus = _corpus(tmp_path / "corpus")
    messages = set()
    for name, (path, expected, extra) in corpus.items():
        before = snapshot(tmp_path)
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        cfg = make_cfg(data=path, output=out.name, **extra)
        with pytest.raises(DatasetError, match=expected) as info:
            run_training(cfg)
        messages.add(str(info.value))
        assert "\n" not in str(info.value)
        assert snapshot(tmp_path, exclude=out) == before, name  # nothing written elsewhere
        leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert leftovers == [], name
    assert len(messages) == len(corpus)  # each problem has its own message
    assert not (tmp_path / "pwned.txt").exists()
