"""Where a dataset's items come from: the image files of each subset (folder or metadata file), their
caption (caption file, metadata entry or class tokens; prefix/suffix applied) and, for ControlNet subsets,
the conditioning image of the same stem (spec §3, §7.2). Used by the manifest stage."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.config.dataset import IMAGE_EXTENSIONS, DatasetsConfig, SubsetConfig, non_utf8_names, refuse_non_utf8
from fluxpipe.data.images import BadCaption, is_image_file, read_caption
from fluxpipe.errors import FluxpipeError, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    dataset: int
    subset: int
    path: Path
    caption: str | None  # None: read from the caption file beside the image
    conditioning: Path | None


def subset_candidates(di: int, si: int, sub: SubsetConfig) -> tuple[list[Candidate], list[str]]:
    """Images (and captions from a metadata file) of one subset; problems as 'file: reason' strings."""
    problems: list[str] = []
    if sub.metadata_file is not None:
        entries = _read_metadata(Path(sub.metadata_file), sub.caption_separator)
        base = Path(sub.image_dir) if sub.image_dir else None
        paths: list[tuple[Path, str | None]] = [(_metadata_image(base, p), c) for p, c in entries]
    else:
        assert sub.image_dir is not None  # the dataset config requires image_dir or metadata_file
        folder, where = Path(sub.image_dir), f"datasets[{di}].subsets[{si}].image_dir"
        paths = [(p, None) for p in _image_files(folder, where)]
        _warn_unused_images(folder, where)
    by_stem, cond_dir = None, None
    if sub.conditioning_data_dir is not None:
        cond_dir = Path(sub.conditioning_data_dir)
        by_stem = _by_stem(_image_files(cond_dir, f"datasets[{di}].subsets[{si}].conditioning_data_dir"))
    out = []
    for path, caption in paths:
        cond = None
        if by_stem is not None and cond_dir is not None:
            cond, problem = _pair(path, by_stem, cond_dir)
            if problem:
                problems.append(problem)
                continue
        out.append(Candidate(dataset=di, subset=si, path=path, caption=caption, conditioning=cond))
    return out, problems


def _image_files(folder: Path, key: str) -> list[Path]:
    """The image files of a folder (by extension), sorted; FluxpipeError naming the setting if it is no folder."""
    if not folder.is_dir():
        raise FluxpipeError(f"{key}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    refuse_non_utf8(non_utf8_names(folder, [p.name for p in files]))
    return files


# image types Pillow reads that the reference does not train on (spec §3.1): left out, but never silently
OTHER_IMAGE_TYPES = (".gif", ".tif", ".tiff", ".avif", ".jxl", ".heic", ".heif", ".ico", ".tga", ".jp2", ".ppm")


def _warn_unused_images(folder: Path, key: str) -> None:
    others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in OTHER_IMAGE_TYPES)
    if others:
        log.warning(
            "%s: %d image files of a type not trained on (only %s) are left out: %s; convert them to PNG to use them",
            key,
            len(others),
            " ".join(IMAGE_EXTENSIONS),
            summarize(others, 20),
        )


def _metadata_image(base: Path | None, key: str) -> Path:
    """The image of a fine-tuning metadata key: the path as written (under image_dir when relative), or, as the
    reference globs it, ``<image_dir>/<key>.<ext>`` for a key given without its extension (keyed by file stem)."""
    path = (base / key) if base and not Path(key).is_absolute() else Path(key)
    if path.is_file():
        return path
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (found := path.with_name(path.name + ext)).is_file():
            return found
    return path


def _by_stem(paths: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in paths:
        out.setdefault(path.stem, []).append(path)
    return out


def _pair(image: Path, by_stem: dict[str, list[Path]], folder: Path) -> tuple[Path | None, str | None]:
    """(the conditioning image of ``image``, None) or (None, the problem): none, or several with its stem."""
    matches = by_stem.get(image.stem, [])
    if len(matches) == 1:
        return matches[0], None
    if not matches:
        return None, (
            f"{image}: no conditioning image {image.stem}.* in {folder} (add one with the same stem, "
            f"or remove the image)"
        )
    names = ", ".join(p.name for p in matches)
    return None, f"{image}: {len(matches)} conditioning images with its stem in {folder}: {names} (keep one)"


def unpaired_conditioning(cfg: DatasetsConfig) -> list[str]:
    """Conditioning images whose stem no image of the (used) subsets reading that folder has (spec §7.2: no
    extras). A folder shared by several subsets pairs with the images of all of them."""
    folders: dict[Path, tuple[Path, set[str], list[str]]] = {}  # resolved -> (as written, target stems, dirs)
    for ds in cfg.datasets:
        for sub in ds.subsets:
            if sub.conditioning_data_dir is None or sub.num_repeats < 1 or not sub.image_dir:
                continue
            cond = Path(sub.conditioning_data_dir)
            _, stems, dirs = folders.setdefault(cond.resolve(), (cond, set(), []))
            stems.update(p.stem for p in _image_files(Path(sub.image_dir), "image_dir"))
            dirs.append(sub.image_dir)
    problems = []
    for cond, stems, dirs in folders.values():
        problems += [
            f"{p}: conditioning image without a target (no image {p.stem}.* in {', '.join(dirs)}; remove "
            f"it or add the image)"
            for p in _image_files(cond, "conditioning_data_dir")
            if p.stem not in stems
        ]
    return problems


def _with_tags(entry: dict, separator: str) -> str:
    """The reference's fine-tuning caption: ``caption``, then ``caption_separator`` and ``tags`` when both are
    given (no space added), ``tags`` alone without a caption, else ""."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return tags or ""
    return f"{caption}{separator}{tags}" if tags else caption


def _read_metadata(path: Path, separator: str = ",") -> list[tuple[str, str]]:
    """The reference's fine-tuning metadata: JSON {path: {caption, tags, ...}} or JSONL {image_path, caption,
    tags}; tags are appended to the caption after ``separator`` (the subset's caption_separator)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            return [(r["image_path"], _with_tags(r, separator)) for r in rows]
        return [(k, _with_tags(v or {}, separator)) for k, v in json.loads(text).items()]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise FluxpipeError(
            f"{path}: unreadable metadata file ({type(e).__name__}: {e}); expected JSON "
            "{image: {caption: ...}} or JSONL lines {image_path, caption}"
        ) from e


def caption_file(image: Path, extension: str) -> Path:
    """The caption file of an image: NAME.ext, else for a face-coordinate name (NAME_CX_CY_W_H, five tokens or
    more) the one without its last four tokens, as the reference looks them up; NAME.ext when neither exists."""
    own = image.with_suffix(extension)
    tokens = image.stem.split("_")
    if own.is_file() or len(tokens) < 5:
        return own
    stripped = image.with_name("_".join(tokens[:-4]) + extension)
    return stripped if stripped.is_file() else own


def caption_of(c: Candidate, sub: SubsetConfig) -> str:
    """The caption the encoders see: caption file (or metadata / class_tokens) plus prefix and suffix."""
    text = c.caption
    if text is None:
        file = caption_file(c.path, sub.caption_extension)
        if file.is_file():
            text = read_caption(file, all_lines=sub.enable_wildcard)
            if not text:  # the reference stops here too ("caption file is empty")
                raise BadCaption(
                    f"{file}: caption file is empty (or only whitespace); write a caption into it, or "
                    "delete it and set class_tokens"
                )
        elif sub.class_tokens is not None:
            text = sub.class_tokens
        else:
            raise FluxpipeError(f"{c.path}: no caption file {file.name} (add it, or set class_tokens)")
    if sub.caption_prefix:
        text = f"{sub.caption_prefix} {text}"
    if sub.caption_suffix:
        text = f"{text} {sub.caption_suffix}"
    return text
