"""folder: and zip: sources, the class layout, broken files and the verification cache."""

import io
import json
import os
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxcls import train
from jaxcls.data import loader, preprocess, sources

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _jpeg(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=95, **kwargs)
  return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
  """A valid PNG header claiming 1.6 gigapixels, in a file of under 100 bytes."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale.
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
  """Stored 32x16 with red left, blue right; EXIF orientation 6 shows it turned 90° CW."""
  image = Image.new("RGB", (32, 16), BLUE)
  image.paste(RED, (0, 0, 16, 16))
  exif = Image.Exif()
  exif[0x0112] = 6
  return _jpeg(image, exif=exif.tobytes())


def _odd_but_good() -> dict[str, bytes]:
  """Files that are unusual but decode: each must be kept and come out as RGB."""
  rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
  rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # Transparent left half → white.
  palette = Image.new("RGB", (16, 16), RED).convert("P", palette=Image.Palette.ADAPTIVE)
  sixteen = Image.fromarray(np.full((16, 16), 65535, np.uint16))
  return {
      "cmyk.jpg": _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))),  # Red.
      "sixteen_bit.png": _png(sixteen),
      "palette.gif": _gif(palette),
      "gray.JPG": _jpeg(Image.new("L", (16, 16), 128)),
      "la.PNG": _png(Image.new("LA", (16, 16), (128, 255))),
      "rgba.png": _png(rgba),
      "rotated.jpeg": _exif_rotated_jpeg(),
      "upper.BMP": _bmp(),
      "image.webp": _webp(),
      "scan.tiff": _tiff(),
  }


def _gif(image):
  buffer = io.BytesIO()
  image.save(buffer, format="GIF")
  return buffer.getvalue()


def _bmp():
  buffer = io.BytesIO()
  Image.new("RGB", (16, 16), (0, 128, 0)).save(buffer, format="BMP")
  return buffer.getvalue()


def _webp():
  buffer = io.BytesIO()
  Image.new("RGB", (16, 16), (0, 128, 0)).save(buffer, format="WEBP", lossless=True)
  return buffer.getvalue()


def _tiff():
  buffer = io.BytesIO()
  Image.new("RGB", (16, 16), (0, 128, 0)).save(buffer, format="TIFF")
  return buffer.getvalue()


def _broken() -> dict[str, bytes]:
  good = _jpeg(Image.new("RGB", (64, 64), RED))
  return {
      "empty.jpg": b"",
      "truncated.jpg": good[:len(good) // 2],
      "text.jpg": b"this is not an image, only text named .jpg\n",
      "bomb.png": _bomb_png(),
  }


@pytest.fixture
def mixed_dir(tmp_path, shapes_dir):
  """shapes (disc/, stripes/) plus every odd-but-good and every broken kind."""
  root = tmp_path / "mixed"
  shutil.copytree(shapes_dir, root)
  for name, data in _odd_but_good().items():
    (root / "disc" / name).write_bytes(data)
  for name, data in _broken().items():
    (root / "stripes" / name).write_bytes(data)
  (root / "stripes" / "Thumbs.db").write_bytes(b"\0" * 100)  # Not an image name.
  (root / "disc" / "notes.txt").write_text("ignored")
  return str(root)


def test_odd_modes_decode_to_rgb_with_the_right_colours():
  files = _odd_but_good()
  load = lambda name: preprocess.load_image(files[name], 16).astype(int)
  np.testing.assert_allclose(load("cmyk.jpg")[8, 8], RED, atol=8)
  np.testing.assert_array_equal(load("sixteen_bit.png")[8, 8], (255, 255, 255))
  np.testing.assert_allclose(load("palette.gif")[8, 8], RED, atol=8)
  np.testing.assert_allclose(load("gray.JPG")[8, 8], (128, 128, 128), atol=3)
  np.testing.assert_array_equal(load("la.PNG")[8, 8], (128, 128, 128))
  rgba = load("rgba.png")
  np.testing.assert_array_equal(rgba[8, 2], (255, 255, 255))  # Transparent → white.
  np.testing.assert_array_equal(rgba[8, 13], BLUE)
  rotated = preprocess.load_image(files["rotated.jpeg"], 16).astype(int)
  # Upright it is 16 wide and 32 tall, red on top: the centre crop is red above blue.
  np.testing.assert_allclose(rotated[1, 8], RED, atol=40)
  np.testing.assert_allclose(rotated[14, 8], BLUE, atol=40)


@pytest.mark.slow
def test_broken_files_are_listed_exactly_and_training_runs(mixed_dir, make_config,
                                                           tmp_path):
  workdir = tmp_path / "work"
  config = make_config("folder:" + mixed_dir)
  _, summary = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in open(workdir / sources.SKIPPED_FILE)]
  skipped = {os.path.basename(row["path"]): row["reason"] for row in rows}
  assert set(skipped) == set(_broken())
  assert "0 bytes" in skipped["empty.jpg"]
  assert "decompression bomb" in skipped["bomb.png"]
  assert all(os.path.isabs(row["path"]) for row in rows)
  assert summary.final_step >= 1 and np.isfinite(summary.last_epoch.train_loss)
  dataset = sources.build_dataset(config.data, config.seed, str(workdir))
  listed = {os.path.basename(p) for p in dataset.train.paths + dataset.val.paths}
  assert set(_odd_but_good()) <= listed
  assert not listed & (set(_broken()) | {"Thumbs.db", "notes.txt"})
  assert len(listed) == 132 + len(_odd_but_good())


def test_verification_is_cached_by_size_and_mtime(mixed_dir, make_config, tmp_path,
                                                  monkeypatch):
  config = make_config("folder:" + mixed_dir)
  first = sources.build_dataset(config.data, config.seed, str(tmp_path))
  calls = []
  real = preprocess.load_image
  monkeypatch.setattr(preprocess, "load_image",
                      lambda src, size: calls.append(src) or real(src, size))
  second = sources.build_dataset(config.data, config.seed, str(tmp_path))
  assert calls == []  # Nothing decoded again.
  assert second.skipped == first.skipped and second.train.paths == first.train.paths
  changed = os.path.join(mixed_dir, "stripes", "text.jpg")
  with open(changed, "wb") as f:
    f.write(_png(Image.new("RGB", (20, 20), BLUE)))  # Now readable, new size and mtime.
  third = sources.build_dataset(config.data, config.seed, str(tmp_path))
  assert len(calls) == 1
  assert len(third.skipped) == len(first.skipped) - 1


def test_a_class_left_empty_is_named(tmp_path, make_config):
  for name in ("Cat", "Dog"):
    (tmp_path / "data" / name).mkdir(parents=True)
  for i in range(5):
    (tmp_path / "data" / "Cat" / f"{i}.jpg").write_bytes(_jpeg(Image.new("RGB", (8, 8))))
  for name, data in _broken().items():
    (tmp_path / "data" / "Dog" / name).write_bytes(data)
  config = make_config(f"folder:{tmp_path / 'data'}")
  with pytest.raises(sources.DataError, match="Class 'Dog' has no readable images"):
    sources.build_dataset(config.data, config.seed, str(tmp_path))


def _zip_folder(folder: str, archive: str, top: str = "PetImages") -> None:
  with zipfile.ZipFile(archive, "w") as zf:
    for dirpath, _, filenames in os.walk(folder):
      for filename in sorted(filenames):
        path = os.path.join(dirpath, filename)
        zf.write(path, top + "/" + os.path.relpath(path, folder).replace(os.sep, "/"))
    zf.writestr(f"{top}/Thumbs.db", b"\0" * 10)
    zf.writestr(f"__MACOSX/{top}/circle/._x.jpg", b"\0" * 10)
    zf.writestr("../escape/circle/evil.jpg", _jpeg(Image.new("RGB", (8, 8))))
    zf.writestr("/absolute/circle/evil.jpg", _jpeg(Image.new("RGB", (8, 8))))


def test_zip_gives_the_same_examples_and_classes_as_the_folder(mixed_dir, make_config,
                                                               tmp_path):
  archive = str(tmp_path / "pets.zip")
  _zip_folder(mixed_dir, archive)
  config = make_config("folder:" + mixed_dir)
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  folder = sources.build_dataset(config.data, config.seed, str(tmp_path / "a"))
  config.data.source = "zip:" + archive
  zipped = sources.build_dataset(config.data, config.seed, str(tmp_path / "b"))
  assert zipped.class_names == folder.class_names == ("disc", "stripes")
  for split in ("train", "val"):
    a, b = getattr(folder, split), getattr(zipped, split)
    assert a.paths == b.paths and a.labels == b.labels
    assert all(a[i]["data"] == b[i]["data"] for i in range(len(a)))
    assert all(m.startswith("PetImages/") and ".." not in m for m in b.members)
  assert ([os.path.basename(r["path"]) for r in zipped.skipped]
          == [os.path.basename(r["path"]) for r in folder.skipped])
  batches = [next(loader.train_batches(d.train, batch_size=16, image_size=16, seed=3,
                                       num_steps=1, workers=2)) for d in (folder, zipped)]
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
  np.testing.assert_array_equal(batches[0]["label"], batches[1]["label"])
  assert not os.path.exists(tmp_path / "escape")  # Nothing was ever extracted.


def test_zip_member_that_inflates_too_much_is_skipped(tmp_path, monkeypatch, make_config):
  archive = str(tmp_path / "big.zip")
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
    for name in ("a", "b"):
      for i in range(10):
        zf.writestr(f"{name}/{i}.png", _png(Image.new("RGB", (8, 8), (i * 20, 0, 0))))
    zf.writestr("a/huge.jpg", b"\0" * 4096)
  monkeypatch.setattr(sources.zip_archive, "MAX_MEMBER_BYTES", 2048)
  config = make_config("zip:" + archive, **{"data.val_fraction": 0.3})
  dataset = sources.build_dataset(config.data, config.seed, str(tmp_path))
  assert [os.path.basename(r["path"]) for r in dataset.skipped] == ["huge.jpg"]
  assert "zip bomb" in dataset.skipped[0]["reason"]


def test_class_folders_one_level_down_and_any_extension_case(tmp_path, make_config):
  for name in ("Cat", "Dog"):
    folder = tmp_path / "PetImages" / name
    folder.mkdir(parents=True)
    for i, ext in enumerate(["jpg", "JPG", "Jpeg", "png", "GIF", "bmp", "webp", "TIF"]):
      image = Image.new("RGB", (8, 8), (i * 30, 0, 0))
      image.save(folder / f"{i}.{ext}", format={"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}
                 .get(ext.lower(), ext.upper()))
    (folder / "Thumbs.db").write_bytes(b"\0")
  listed, class_names = sources.list_folder(str(tmp_path))
  assert class_names == ("Cat", "Dog")
  assert listed.root == str(tmp_path / "PetImages")
  assert len(listed) == 16 and listed.paths[0] == "Cat/0.jpg"


def test_unknown_source_kind_lists_the_kinds(make_config):
  config = make_config("s3://bucket")
  with pytest.raises(sources.DataError, match="tfds:NAME.*folder:PATH.*zip:PATH"):
    sources.build_dataset(config.data, config.seed)


@pytest.mark.parametrize("cpu_max, affinity, expected", [
    ("max 100000\n", range(8), 8),        # No quota: every CPU of the affinity mask.
    ("200000 100000\n", range(8), 2),     # Two CPUs' worth of time.
    ("150000 100000\n", range(8), 2),     # 1.5 CPUs: two threads keep the quota busy.
    ("50000 100000\n", range(8), 1),      # Half a CPU: still one thread.
    ("400000 100000\n", (0, 5), 2),       # The affinity mask is the tighter limit.
    (None, range(6), 6),                  # No cgroup file (not Linux v2): the mask.
])
def test_usable_cpu_count_reads_the_affinity_mask_and_the_cgroup_quota(
    tmp_path, monkeypatch, cpu_max, affinity, expected):
  path = tmp_path / "cpu.max"
  if cpu_max is not None:
    path.write_text(cpu_max)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
  monkeypatch.setattr(sources.base, "CGROUP_CPU_MAX", str(path))
  monkeypatch.setattr(os, "cpu_count", lambda: 64)  # The machine: never what is usable.
  assert sources.usable_cpu_count(str(path)) == expected
  assert sources.worker_count(0) == expected  # data.workers = 0: one per usable CPU.
  assert sources.worker_count(3) == 3  # An explicit count is kept.
