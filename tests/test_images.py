"""Subject image files: conversion of unusual modes, clear refusals of unusable files."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nested_attention import NestedAttentionError
from nested_attention.images import load_image


def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels but carries no data (a decompression bomb stand-in)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_unusual_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    image = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (32, 32)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (5, 5, 15, 15))
    rgba.save(tmp_path / "pet.png")
    loaded = np.asarray(load_image(tmp_path / "pet.png"))
    assert tuple(loaded[0, 0]) == (255, 255, 255) and tuple(loaded[10, 10]) == (0, 0, 255)


def test_unusable_files_are_refused_with_their_name(tmp_path):
    with pytest.raises(NestedAttentionError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(np.random.RandomState(0).bytes(300))
    with pytest.raises(NestedAttentionError, match="corrupt.png could not be read as an image"):
        load_image(tmp_path / "corrupt.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(NestedAttentionError, match="tiny.png is 8x8 pixels.*at least 16"):
        load_image(tmp_path / "tiny.png")
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # above Pillow's own bomb limit
    with pytest.raises(NestedAttentionError, match="bomb.png is too large to decode safely"):
        load_image(tmp_path / "bomb.png")
    png_header_only(tmp_path / "huge.png", 9_000, 8_000)  # below Pillow's limit, above ours
    with pytest.raises(NestedAttentionError, match="huge.png is 9000x8000 pixels"):
        load_image(tmp_path / "huge.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(NestedAttentionError, match="not a file"):
        load_image(tmp_path / "folder.png")
