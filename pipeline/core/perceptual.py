"""Perceptual hashes, and grouping images whose hashes are close, without comparing all pairs.

Why our own DCT hash rather than the `imagehash` package: it decodes through the project's one
decoder (`images.decode_image`: EXIF orientation, CMYK, alpha, 16-bit, exactly what training
sees) at a reduced JPEG DCT scale (several times faster), needs no SciPy/PyWavelets, and
lets us hash two views of an image: as stored, and with a uniform frame trimmed (a bordered
copy then matches its original).

An image's view is hashed twice from one 32x32 DCT: a coarse 64-bit hash (the 8x8 lowest
frequencies against their median, the classic pHash) that is indexed, and a fine 256-bit one
(16x16) that confirms a match. The hashes see grey levels only, and on a picture with little
in it (a flat field with a few shapes, a product shot on white, text on a plain background)
their bits are decided by noise: so a match is confirmed by the view's colours too (8x8
cells), and more strictly for a picture with little structure. Measured (BENCHMARKS.md,
scripts/bench/dedup.py --precision): 0 false pairs among 203,203 pairs of 638 distinct
images (400 hard negatives, 80 tiles of real photographs, 158 of the synthetic sample), and
709 of 712 copies found (re-encoded at q60, rescaled 0.5x, cropped 3%, bordered 5%; of 20 real
photographs and 158 sample images) - the same recall as the hashes alone, which made 108
false pairs of them.

Grouping uses multi-index hashing: a 64-bit hash split into 4 blocks of 16 bits; two hashes
within distance d agree within d // 4 bits on at least one block (pigeonhole), so each block
is probed with every mask of at most d // 4 bits through a dense 65,536-entry table. Cost is
linear in the number of images times the probes, never quadratic.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.images import decode_image

HASH_SIDE = 32  # the image is shrunk to HASH_SIDE x HASH_SIDE before the DCT
COARSE_SIDE = 8  # 8 x 8 = 64 bits, indexed
FINE_SIDE = 16  # 16 x 16 = 256 bits, four uint64 words, to confirm
FINE_WORDS = FINE_SIDE * FINE_SIDE // 64
VIEW_DIGITS = 16 * (1 + FINE_WORDS)  # a view as hex: coarse, then fine
DECODE_SIDE = 128  # JPEGs decode at the DCT scale that keeps this shorter side
COLOUR_GRID = 8  # label compares colours in 8 x 8 cells
COLOUR_BYTES = 3 * COLOUR_GRID * COLOUR_GRID
# A copy's colours, measured on the sets of scripts/bench/dedup.py --precision: the cells of a
# re-encode, 0.5x rescale, 3% crop or 5% border stayed within 41 levels and 6.6 on average;
# hard negatives (flat fields with small shapes, product shots on white, sky, text on plain
# backgrounds) that pass both hashes differed by 48 or more somewhere, or by 9 on average.
COLOUR_WORST = 44  # levels (of 255) any cell's channel may differ by
COLOUR_MEAN = 8.0  # levels, on average over the cells and channels
# A picture with little structure (grey std under FLAT_STRUCTURE at 32 x 32: flat fields,
# product shots, text) is a copy only with colours and fine hash closer still.
FLAT_STRUCTURE = 12.0
FLAT_COLOUR_WORST = 24
FLAT_FINE = 40
BLOCKS = 4
BLOCK_BITS = 64 // BLOCKS
BLOCK_VALUES = 1 << BLOCK_BITS
MAX_TRIM = 0.15  # at most this share of a side is taken as border
BORDER_MEAN = 5.0  # a border line's mean grey distance from the frame colour, at most
BORDER_FAR = 32.0  # a pixel this far from the frame colour is content...
BORDER_FAR_SHARE = 0.02  # ...and a line with more such pixels is not border (JPEG ringing)

View = tuple[int, tuple[int, ...]]  # (coarse 64-bit hash, fine hash as FINE_WORDS words)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    matrix = np.sqrt(2 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(HASH_SIDE)


class Signature(NamedTuple):
    """One view of an image as `label` compares it: its hashes, its colour (the mean RGB of
    COLOUR_GRID x COLOUR_GRID cells, row by row) and how much structure it has (the standard
    deviation of its grey levels at HASH_SIDE x HASH_SIDE)."""

    view: View
    colour: bytes
    structure: float


def hash_image(source: str | Path | bytes | BinaryIO) -> list[Signature]:
    """The signatures of an image's views: as stored, and trimmed when it has a uniform frame.

    Raises images.ImageDecodeError for an image that cannot be decoded.
    """
    return signatures(decode_image(source, min_side=DECODE_SIDE))


def signatures(image: Image.Image, grey: Image.Image | None = None) -> list[Signature]:
    """hash_image's work on an image already decoded (at about DECODE_SIDE; `grey`: its "L"
    conversion when the caller has it)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    grey = grey if grey is not None else rgb.convert("L")
    boxes = [(0, 0, *grey.size)]
    box = _trim_box(np.asarray(grey, dtype=np.float32))
    if box != boxes[0]:
        boxes.append(box)
    return [_signature(rgb.crop(box), grey.crop(box)) for box in boxes]


def _signature(rgb: Image.Image, grey: Image.Image) -> Signature:
    small = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BOX), dtype=np.float64)
    return Signature(_hash_pixels(small), colour_cells(rgb, COLOUR_GRID), float(small.std()))


def colour_cells(image: Image.Image, grid: int) -> bytes:
    """The mean RGB of grid x grid cells, row by row: what tells apart pictures whose grey
    structure is alike (a green field and a blue one)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((grid, grid), Image.BOX).tobytes()


def signature_to_json(signature: Signature) -> list:
    coarse, fine = signature.view
    return [coarse, list(fine), signature.colour.hex(), round(signature.structure, 2)]


def signature_from_json(value: list) -> Signature:
    """The inverse of signature_to_json; ValueError (or TypeError) for anything else."""
    coarse, fine, colour, structure = value
    signature = Signature((int(coarse), tuple(int(word) for word in fine)),
                          bytes.fromhex(colour), float(structure))
    if len(signature.view[1]) != FINE_WORDS or len(signature.colour) != COLOUR_BYTES:
        raise ValueError("not a signature")
    return signature


def hash_view(image: Image.Image) -> View:
    """The hashes of an image as it is (no frame trimming): for a caller that has decoded it
    already, best at the DECODE_SIDE scale."""
    grey = image if image.mode == "L" else image.convert("L")
    return _hash_pixels(np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BOX),
                                   dtype=np.float64))


def _hash_pixels(pixels: np.ndarray) -> View:
    """The coarse and fine hashes of HASH_SIDE x HASH_SIDE grey levels."""
    spectrum = _DCT @ pixels @ _DCT.T
    coarse = _bits(spectrum[:COARSE_SIDE, :COARSE_SIDE])
    fine = _bits(spectrum[:FINE_SIDE, :FINE_SIDE])
    return int(coarse[0]), tuple(int(word) for word in fine)


def view_to_hex(view: View) -> str:
    """A view as VIEW_DIGITS hex digits (coarse, then fine): how gather's journal stores it."""
    coarse, fine = view
    return f"{coarse:016x}" + "".join(f"{word:016x}" for word in fine)


def view_from_hex(text: str) -> View:
    """The inverse of view_to_hex; ValueError for anything else."""
    if len(text) != VIEW_DIGITS:
        raise ValueError(f"a perceptual hash has {VIEW_DIGITS} hex digits")
    words = [int(text[i:i + 16], 16) for i in range(0, len(text), 16)]
    return words[0], tuple(words[1:])


def coarse_from_hex(text: str) -> int:
    """Only the coarse hash of view_to_hex's text (its first 16 digits), without parsing the
    rest; ValueError when they are not hex."""
    return int(text[:16], 16)


def fine_distance(a: View, b: View) -> int:
    """Bits in which two views' fine hashes differ."""
    return sum((x ^ y).bit_count() for x, y in zip(a[1], b[1], strict=True))


class ViewSet:
    """A few hundred views at most (known placeholders), compared with a new one in one
    vectorised step; grown by doubling, so adding one by one stays linear."""

    def __init__(self, views: Iterable[View] = ()) -> None:
        self._coarse = np.empty(16, np.uint64)
        self._fine = np.empty((16, FINE_WORDS), np.uint64)
        self._count = 0
        for view in views:
            self.add(view)

    def __len__(self) -> int:
        return self._count

    def add(self, view: View) -> None:
        if self._count == len(self._coarse):
            self._coarse = np.resize(self._coarse, 2 * self._count)
            self._fine = np.resize(self._fine, (2 * self._count, FINE_WORDS))
        self._coarse[self._count] = view[0]
        self._fine[self._count] = view[1]
        self._count += 1

    def near(self, view: View, coarse_distance: int, fine_distance: int) -> list[int]:
        """The positions (in order added) of the views within both distances of `view`."""
        coarse = self._coarse[:self._count]
        close = np.flatnonzero(np.bitwise_count(coarse ^ np.uint64(view[0])) <= coarse_distance)
        if not close.size:
            return []
        fine = np.bitwise_count(self._fine[close] ^ np.array(view[1], np.uint64)).sum(axis=1)
        return close[fine <= fine_distance].tolist()


def _bits(block: np.ndarray) -> np.ndarray:
    """Each coefficient above the block's median is a 1, packed big-endian into uint64s."""
    values = block.ravel()
    return np.packbits(values > np.median(values)).view(">u8").astype(np.uint64)


def _trim_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) inside a frame of the outer edge's colour.

    A line is border when its pixels are on average close to that colour and few are far
    from it (JPEG rings next to the content); at most MAX_TRIM of each side is removed.
    """
    height, width = grey.shape
    frame = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    distance = np.abs(grey - np.median(frame))
    far = distance > BORDER_FAR
    rows = (distance.mean(axis=1) <= BORDER_MEAN) & (far.mean(axis=1) <= BORDER_FAR_SHARE)
    cols = (distance.mean(axis=0) <= BORDER_MEAN) & (far.mean(axis=0) <= BORDER_FAR_SHARE)
    top, bottom = _run(rows, height), height - _run(rows[::-1], height)
    left, right = _run(cols, width), width - _run(cols[::-1], width)
    return left, top, right, bottom


def _run(is_border: np.ndarray, length: int) -> int:
    limit = int(length * MAX_TRIM)
    inside = np.flatnonzero(~is_border[:limit])
    return int(inside[0]) if inside.size else limit


class HashTable:
    """Signatures of many images as arrays: `owner[k]` is the image signature k belongs to."""

    def __init__(self, signatures_per_image: Iterable[list[Signature]]) -> None:
        coarse, fine, colour, structure, owner = [], [], [], [], []
        for image, signatures in enumerate(signatures_per_image):
            for signature in signatures:
                coarse.append(signature.view[0])
                fine.append(signature.view[1])
                colour.append(signature.colour)
                structure.append(signature.structure)
                owner.append(image)
        self.coarse = np.array(coarse, dtype=np.uint64)
        self.fine = np.array(fine, dtype=np.uint64).reshape(-1, FINE_WORDS)
        self.colour = np.frombuffer(b"".join(colour), np.uint8).reshape(-1, COLOUR_BYTES)
        self.structure = np.array(structure, dtype=np.float32)
        self.owner = np.array(owner, dtype=np.int64)


class BlockIndex:
    """Rows of 64-bit hashes indexed by each of their BLOCKS 16-bit blocks (multi-index
    hashing): two hashes within d bits agree within d // BLOCKS bits on at least one block
    (pigeonhole), so probing every block with its value and the values within d // BLOCKS bits
    of it finds every near row without comparing all pairs. Per block a dense table says where
    the rows with each block value start in that block's order: 16 bytes a row (four int32
    orders) and 1 MB of tables. `label` finds all near pairs with it; gather finds the kept
    images near a new one."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.asarray(hashes, np.uint64)
        self.orders: list[np.ndarray] = []
        # (BLOCKS, BLOCK_VALUES + 1): a probe of every block is one lookup; `starts` views it
        self._table = np.zeros((BLOCKS, BLOCK_VALUES + 1), np.int32)
        for block in range(BLOCKS):
            keys = block_keys(self.hashes, block)
            self.orders.append(np.argsort(keys, kind="stable").astype(np.int32))
            np.cumsum(np.bincount(keys, minlength=BLOCK_VALUES), out=self._table[block, 1:])
        self.starts = list(self._table)

    def __len__(self) -> int:
        return len(self.hashes)

    def rows_with(self, block: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, row) for every row whose `block` equals values[k], k ascending."""
        starts = self.starts[block]
        begin, end = starts[values], starts[values + 1]
        counts = (end - begin).astype(np.int64)
        total = int(counts.sum())
        if not total:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        which = np.repeat(np.arange(len(values)), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        return which, self.orders[block][np.repeat(begin, counts) + within].astype(np.int64)

    def near(self, value: int, max_distance: int) -> np.ndarray:
        """The rows within max_distance bits of `value`, ascending. Asked once per image
        gather keeps, and most have no near row: every block's probes are looked up in one
        step, and nothing more is done when they all come up empty."""
        keys = (np.array([(value >> (block * BLOCK_BITS)) & (BLOCK_VALUES - 1)
                          for block in range(BLOCKS)])[:, None]
                ^ block_masks(max_distance // BLOCKS)[None, :])
        blocks = np.arange(BLOCKS)[:, None]
        begin, end = self._table[blocks, keys], self._table[blocks, keys + 1]
        hits = np.argwhere(end > begin).tolist()
        if not hits:
            return np.empty(0, np.int64)
        rows = np.concatenate([self.orders[block][begin[block, k]:end[block, k]]
                               for block, k in hits]).astype(np.int64)
        rows = rows[np.bitwise_count(self.hashes[rows] ^ np.uint64(value)) <= max_distance]
        return np.unique(rows)


def block_keys(hashes: np.ndarray | np.uint64, block: int) -> np.ndarray:
    """Block `block` of every hash, as the index's int64 table keys."""
    return ((hashes >> np.uint64(block * BLOCK_BITS)) & np.uint64(BLOCK_VALUES - 1)).astype(
        np.int64)


@cache
def block_masks(max_bits: int) -> np.ndarray:
    """Every BLOCK_BITS-bit mask with at most `max_bits` bits set (made once, read-only)."""
    masks = np.array([sum(1 << bit for bit in bits) for count in range(max_bits + 1)
                      for bits in combinations(range(BLOCK_BITS), count)], np.int64)
    masks.setflags(write=False)
    return masks


def near_pairs(table: HashTable, coarse_distance: int, fine_distance: int) -> set[tuple[int, int]]:
    """Pairs of different images (i < j) with a view pair within both distances."""
    found: set[tuple[int, int]] = set()
    if len(table.coarse) < 2:
        return found
    index = BlockIndex(table.coarse)
    for block in range(BLOCKS):
        keys = block_keys(table.coarse, block)
        for mask in block_masks(coarse_distance // BLOCKS):
            left, right = index.rows_with(block, keys ^ mask)
            found.update(_confirmed(table, left, right, coarse_distance, fine_distance))
    return found


def _confirmed(table: HashTable, left: np.ndarray, right: np.ndarray, coarse_distance: int,
               fine_distance: int) -> Iterable[tuple[int, int]]:
    """The candidate pairs that are copies: close hashes, and close colours (strictly so
    where either picture has little structure: its hash bits are decided by noise)."""
    owners_left, owners_right = table.owner[left], table.owner[right]
    keep = owners_left < owners_right
    left, right = left[keep], right[keep]
    keep = np.bitwise_count(table.coarse[left] ^ table.coarse[right]) <= coarse_distance
    left, right = left[keep], right[keep]
    fine = np.bitwise_count(table.fine[left] ^ table.fine[right]).sum(axis=1)
    colour = np.abs(table.colour[left].astype(np.int16) - table.colour[right])
    worst, mean = colour.max(axis=1), colour.mean(axis=1)
    flat = np.minimum(table.structure[left], table.structure[right]) < FLAT_STRUCTURE
    keep = ((fine <= fine_distance) & (worst <= COLOUR_WORST) & (mean <= COLOUR_MEAN)
            & (~flat | ((worst <= FLAT_COLOUR_WORST) & (fine <= FLAT_FINE))))
    return zip(table.owner[left[keep]].tolist(), table.owner[right[keep]].tolist(), strict=True)


def components(count: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected groups (of two or more) of `count` items linked by `pairs`, sorted."""
    parent = list(range(count))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for item in range(count):
        groups.setdefault(root(item), []).append(item)
    return sorted(group for group in groups.values() if len(group) > 1)
