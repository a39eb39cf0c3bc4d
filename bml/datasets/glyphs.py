"""`glyphs`: the embedded default data set, rendered from the fonts matplotlib ships.

Like Omniglot, each character is a class and its instances are renderings: 16 typefaces (DejaVu
Sans/Serif/Mono and STIXGeneral, 4 styles each) under random rotation, shear, scale, aspect, shift,
stroke width, ink/paper contrast and pixel noise. Characters that look alike (Latin A / Greek Alpha /
Cyrillic A, O/0, l/I/1, c/C, ...) are left out so that no two classes are the same shape.

Built on first use in a few seconds, deterministically (fixed seed), and cached as an .npz under
`$BML_CACHE_DIR` (default `~/.cache/bml`); the file name carries a version that changes whenever the
rendering does, and a digest of the versions of what renders it (`renderer_versions`), so that
another matplotlib, Pillow, FreeType or numpy builds its own file instead of reusing images it
would not draw the same way. The file also holds a digest of what built it and of its arrays (`cache_digest`),
checked at every load (18 MB hashed, some 30 ms): an edited cache (its splits swapped, say) is rebuilt.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bml.utils.io import atomic_write, not_regular_file
from bml.utils.messages import warn

from .base import ReadOptions, SplitData
from .errors import DatasetError
from .image_files import cache_dir

GLYPHS_VERSION = 1
IMAGE_SIZE = 32
IMAGES_PER_CLASS = 60
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
SEED = 20210826

# 100 mutually distinct shapes. Left out: letters equal to another class up to scale (c C, o O 0, s S,
# u U, v V, w W, x X, z Z, k K, p P, y Y), the l/I/1/| family, and Greek/Cyrillic twins of Latin
# letters or of each other (Alpha, Pi/Pe, Phi/Ef, Gamma/Ge, Ze/3, theta/Theta, ...).
CHARACTERS = (
    "ABCDEFGHJKLMNPQRSTUVWXYZ"
    "abdefghijmnqrt"
    "23456789"
    "ΓΔΘΛΞΠΣΦΨΩ"
    "αβγδεζλμξσω"
    "БДЖИЦЧШЭЮЯЫ"
    "&@#%?§¶$€£¥+=*~∞√∫≠±÷≥"
)
FONT_FILES = tuple(
    f"{family}{style}.ttf"
    for family, styles in (
        ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
        ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
    )
    for style in styles
)

_CANVAS = 4 * IMAGE_SIZE   # rendered at 4x, then downsampled with antialiasing
_FONT_SIZE = 3 * IMAGE_SIZE


def renderer_versions() -> dict[str, str]:
    """The versions that decide the rendered pixels: matplotlib ships the fonts and, with its FreeType, says
    which font has which character; Pillow draws and resamples them with its FreeType; numpy draws the
    random distortions."""
    import matplotlib
    import PIL
    from matplotlib.ft2font import __freetype_version__ as matplotlib_freetype
    from PIL import features

    return {"matplotlib": matplotlib.__version__, "matplotlib_freetype": matplotlib_freetype,
            "pillow": PIL.__version__, "pillow_freetype": str(features.version("freetype2")),
            "numpy": np.__version__}


def cache_path() -> Path:
    versions = ",".join(f"{name}={version}" for name, version in sorted(renderer_versions().items()))
    digest = hashlib.sha256(versions.encode()).hexdigest()[:10]
    return cache_dir() / f"glyphs_v{GLYPHS_VERSION}_{IMAGE_SIZE}px_{digest}.npz"


def _font_dir() -> Path:
    import matplotlib  # here, not at import time: `--help` of the entry scripts stays fast

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _fonts_with(characters: str) -> list[list[ImageFont.FreeTypeFont]]:
    """For every character, the fonts whose character map actually has a glyph for it."""
    from matplotlib.ft2font import FT2Font

    fonts = []
    for file in FONT_FILES:
        path = _font_dir() / file
        if not path.exists():
            raise DatasetError(f"glyphs needs matplotlib's font {path}: reinstall matplotlib (pip install -U matplotlib)")
        fonts.append((set(FT2Font(str(path)).get_charmap()), ImageFont.truetype(str(path), _FONT_SIZE)))
    per_character = [[font for charmap, font in fonts if ord(c) in charmap] for c in characters]
    for character, available in zip(characters, per_character):
        if len(available) < 4:
            raise DatasetError(f"glyphs: only {len(available)} fonts have '{character}'; check the matplotlib install")
    return per_character


def _render(character: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
    """One distorted rendering, IMAGE_SIZE x IMAGE_SIZE uint8 grey, dark ink on light paper."""
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(canvas).text((_CANVAS / 2, _CANVAS / 2), character, fill=255, font=font, anchor="mm",
                                stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
    box = canvas.getbbox()
    if box is None:
        raise DatasetError(f"glyphs: font {font.getname()} renders '{character}' empty; check the matplotlib install")
    left, top, right, bottom = box
    # Affine map from output pixels back to the glyph: fit its longer side to a random fraction of the
    # canvas, then rotate, shear, stretch and shift it.
    scale = rng.uniform(0.55, 0.85) * _CANVAS / max(right - left, bottom - top)
    angle, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.2, 0.2)
    aspect = np.exp(rng.uniform(-0.15, 0.15))
    forward = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) \
        @ np.array([[aspect, shear], [0.0, 1 / aspect]])
    inverse = np.linalg.inv(forward)
    centre_out = _CANVAS / 2 + rng.uniform(-0.08, 0.08, size=2) * _CANVAS
    centre_in = np.array([(left + right) / 2, (top + bottom) / 2])
    offset = centre_in - inverse @ centre_out
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    ink = canvas.transform(canvas.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    ink = np.asarray(ink.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32) / 255
    paper, darkness = rng.uniform(200, 255), rng.uniform(0.6, 1.0)
    pixels = paper * (1 - darkness * ink) + rng.normal(0, rng.uniform(2, 12), ink.shape)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def build_glyphs() -> dict[str, np.ndarray]:
    """Render the whole data set: images (N, S, S, 3) uint8, labels (N,), characters, class split."""
    rng = np.random.default_rng(SEED)
    fonts = _fonts_with(CHARACTERS)
    images = np.empty((len(CHARACTERS) * IMAGES_PER_CLASS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for c, (character, available) in enumerate(zip(CHARACTERS, fonts)):
        for k in range(IMAGES_PER_CLASS):
            images[c * IMAGES_PER_CLASS + k] = _render(character, available[k % len(available)], rng)
    order = rng.permutation(len(CHARACTERS))
    bounds = np.cumsum([0, *SPLIT_CLASSES.values()])
    class_split = np.empty(len(CHARACTERS), dtype="<U5")
    for split, start, stop in zip(SPLIT_CLASSES, bounds[:-1], bounds[1:]):
        class_split[order[start:stop]] = split
    return {
        "images": np.repeat(images[..., None], 3, axis=-1),
        "labels": np.repeat(np.arange(len(CHARACTERS)), IMAGES_PER_CLASS),
        "characters": np.array(list(CHARACTERS)),
        "class_split": class_split,
    }


CACHED_ARRAYS = {"images", "labels", "characters", "class_split"}
DIGEST = "digest"
"""The cache file's array holding `cache_digest` of the others."""


def cache_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of what renders the set (its parameters and `renderer_versions`) and of the cached arrays (names,
    dtypes, shapes and bytes)."""
    digest = hashlib.sha256(repr((GLYPHS_VERSION, IMAGE_SIZE, IMAGES_PER_CLASS, SPLIT_CLASSES, SEED, CHARACTERS,
                                  FONT_FILES, sorted(renderer_versions().items()))).encode())
    for name in sorted(CACHED_ARRAYS):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a note that it is rebuilt) when the file is damaged, incomplete or edited
    (its digest differs from its contents'), or not a regular file (a FIFO would block the read)."""
    try:
        if problem := not_regular_file(path):
            raise OSError(problem)
        with np.load(path, allow_pickle=False) as cached:
            arrays = {key: cached[key] for key in cached.files}
        problem = None if set(arrays) == CACHED_ARRAYS | {DIGEST} else f"arrays {sorted(arrays)}"
        if problem is None and str(arrays.pop(DIGEST)) != cache_digest(arrays):
            problem = "its arrays differ from those it was written with"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return arrays
    warn(f"the glyphs cache {path} is damaged ({problem}): rebuilding it")
    return None


def load_glyphs() -> dict[str, np.ndarray]:
    """The cached arrays, built and written atomically (temp file + rename) on first use, and rebuilt
    when the cache is damaged."""
    path = cache_path()
    arrays = read_cache(path) if path.exists() else None
    if arrays is None:
        arrays = build_glyphs()
        try:
            with atomic_write(path) as handle:
                np.savez_compressed(handle, **arrays, **{DIGEST: np.array(cache_digest(arrays))})
        except OSError as error:   # an unwritable, full or misplaced cache folder: the set is used from memory
            warn(f"cannot keep the glyphs cache in {path.parent} ({error.strerror or error}): using the rendered set "
                 "from memory (it is rendered again next time; set BML_CACHE_DIR to a writable folder)")
    return arrays


def read_glyphs(folder: Path | None, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """The classes of one split: labels 0..C-1 in the order of CHARACTERS. A data set reader that needs no data
    (`folder` is None) and no options: the images are rendered at IMAGE_SIZE, the transform resizes them."""
    arrays = load_glyphs()
    classes = np.flatnonzero(arrays["class_split"] == split)
    keep = np.isin(arrays["labels"], classes)
    labels = np.searchsorted(classes, arrays["labels"][keep])
    images = arrays["images"][keep]
    return SplitData(labels=labels, class_names=[str(c) for c in arrays["characters"][classes]],
                     images=images, image_shape=images.shape[1:])
