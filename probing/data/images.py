"""Where a dataset's images live on disk, and decoding them with errors that name the file.

Image paths are built from ids, never from REFER's `ref['file_name']` (it carries an `_<ann_id>` suffix
that no real file has). Each dataset has an ordered list of layouts; the first layout
holding the file wins, and when none does the first candidate is returned so that the error names it.
"""

from __future__ import annotations

from pathlib import Path

from probing.core.errors import ProbingError


def coco2014_candidates(images_dir: Path, image_id: int) -> list[Path]:
    """RefCOCOg / RCM: COCO train2014 name first, then the COCO 2017 name of the same image id."""
    images_dir = Path(images_dir)
    return [
        images_dir / "train2014" / f"COCO_train2014_{image_id:012d}.jpg",
        images_dir / "train2017" / f"{image_id:012d}.jpg",
    ]


def vsr_candidates(images_dir: Path, file_name: str) -> list[Path]:
    """VSR: the merged `trainval2017/` folder of its download recipe, else `train2017/`, then `val2017/`."""
    images_dir = Path(images_dir)
    return [images_dir / folder / file_name for folder in ("trainval2017", "train2017", "val2017")]


def resolve_image(candidates: list[Path]) -> Path:
    """The first candidate that exists, or the first candidate (so a later error names the expected file)."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def load_rgb_image(path: Path, max_pixels: int | None = None):
    """Decode an image as RGB (PIL); a missing, corrupt or oversized file is a ProbingError naming it.

    Oversized: more pixels than `max_pixels` (default Pillow's own `Image.MAX_IMAGE_PIXELS`, about 89 Mpx; None
    there: no limit), judged from the header before any pixel is decoded, so a few bytes claiming 40,000 x 40,000
    pixels (a decompression bomb) never allocate gigabytes. Pillow raises `DecompressionBombError` itself past
    twice its limit and only warns below that; here the limit is applied to each call and Pillow's warning is
    made that call's error (the filter is restored on return), never changed for the whole process."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if limit is not None and image.width * image.height > limit:
                    raise ProbingError(
                        f"{path}: image of {image.width} x {image.height} pixels refused (more than {limit:,} "
                        "pixels: a decompression bomb?)"
                    )
                image.load()
                return image.convert("RGB")
    except FileNotFoundError:
        raise ProbingError(f"{path}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ProbingError(f"{path}: image refused ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # PIL raises OSError for truncated files and SyntaxError for some malformed headers.
        raise ProbingError(f"{path}: image cannot be decoded ({error})") from None
