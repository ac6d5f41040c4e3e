"""Readers: image/mask folders, nnU-Net v2 raw data sets and the synthetic generator, behind
:func:`load_dataset`.

Formats (``DataConfig.format = "auto"`` detects them in this order):

- ``synthetic``: ``DataConfig.path == "synthetic"`` → :func:`rndpo.data.make_synthetic`.
- ``nnunet``: the folder has ``dataset.json`` (nnU-Net v2 raw: ``channel_names``, ``labels``,
  ``file_ending``; ``imagesTr/<case>_0000<ext>`` (more channels ``_0001``...), ``labelsTr/<case><ext>``;
  ``.png`` (2D) or ``.nii.gz`` / ``.nii`` (2D or 3D, read with nibabel, voxel order as stored).
  An optional ``dataset`` entry ``{case: {"images": [...], "label": ...}}`` lists files explicitly;
  those paths must stay inside the data set folder.
- ``folder``: ``images/<case>.<ext>`` + ``masks/<case>.<ext>`` (png, jpg, bmp, tif) and an optional
  ``metadata.csv`` with a ``case_id`` column (the layout of ../shared/data). Grayscale images give
  one channel, RGB three (alpha dropped); an RGB file whose three channels are equal is grayscale
  (one channel), and a data set mixing grayscale and colour images gets three channels throughout.
  Masks must be lossless (png, bmp, tif). A data set without ``masks/`` is unlabeled (``masks=None``).

Labels: binary masks stored as 0/255 (unique values a subset of {0, 255}) are read as 0/1 unless 255
is a declared label. ``num_classes`` is ``max(declared labels) + 1`` for nnU-Net and
``max(label seen) + 1`` (at least 2) for folders. Any other value outside the declared labels is a
:class:`DataError` naming the case.
"""

from __future__ import annotations

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from rndpo.config import DataConfig
from rndpo.data.dataset import SegDataset
from rndpo.data.preprocess import NORMALISATION, to_training_size
from rndpo.data.synthetic import make_synthetic
from rndpo.errors import DataError

__all__ = ["load_dataset", "detect_format", "read_image", "read_mask", "list_folder_cases", "list_nnunet_cases",
           "CaseFiles", "GROUP_COLUMNS", "MAX_FOLDER_LABEL"]

#: metadata.csv columns used as the default grouping key, in order of preference.
GROUP_COLUMNS = ("patient_case", "exam_id", "patient_id", "subject_id", "patient")
#: Highest label value a folder mask may hold (a larger value means the mask is not a label map).
MAX_FOLDER_LABEL = 63
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
NNUNET_ENDINGS = (".png", ".nii.gz", ".nii")


@dataclass
class CaseFiles:
    """The files of one case: one or more image files (channels) and an optional label file."""

    case_id: str
    images: list[Path]
    mask: Path | None
    root: Path = field(default_factory=Path)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# ------------------------------------------------------------------------------------------------
# single files
# ------------------------------------------------------------------------------------------------
def _shape_text(shape: tuple[int, ...]) -> str:
    """``W x H`` for 2D arrays (as image viewers report it), ``X x Y x Z`` for volumes."""
    if len(shape) == 2:
        return f"{shape[1]}x{shape[0]}"
    return "x".join(str(s) for s in shape)


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii.gz") or path.name.endswith(".nii")


def _read_nifti(path: Path, what: str) -> np.ndarray:
    import nibabel as nib

    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds
        raise DataError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from None
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim not in (2, 3):
        raise DataError(f"{what} {path} has shape {data.shape}; expected a 2D image or a 3D volume (one channel per file)")
    return data


def read_image(path: str | os.PathLike, *, label: str | None = None) -> np.ndarray:
    """Read one image file as ``(C, *spatial)`` float32: grayscale → 1 channel, RGB(A) → 3.

    Raises:
        DataError: unreadable or corrupt file (the message names it).
    """
    path = Path(path)
    label = label or str(path)
    if _is_nifti(path):
        return _read_nifti(path, "image").astype(np.float32)[None]
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
                array = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            elif mode in ("LA", "PA"):
                array = np.asarray(img.convert("L"), dtype=np.float32)[None]
            else:  # L, 1, I, I;16, F
                array = np.asarray(img, dtype=np.float32)
                array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {label}: {type(error).__name__}: {error}") from None
    return np.ascontiguousarray(array)


def read_mask(path: str | os.PathLike, *, label: str | None = None) -> np.ndarray:
    """Read one label map as ``(*spatial)`` integer array (uint8/uint16/int64; values unchecked, see
    :func:`_check_labels`).

    RGB masks are accepted only when their three channels are equal.
    """
    path = Path(path)
    label = label or str(path)
    if _is_nifti(path):
        data = _read_nifti(path, "mask")
        if np.issubdtype(data.dtype, np.floating):
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise DataError(f"mask {label} holds non-integer values; expected integer labels")
        return data.astype(np.int64)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                array = np.asarray(img)  # palette index = label (as nnU-Net / VOC)
            elif img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(f"mask {label} is a colour image; expected a single-channel label map")
                array = rgb[..., 0]
            elif img.mode == "LA":
                array = np.asarray(img.convert("L"))
            elif img.mode == "F":
                array = np.asarray(img)
                if not np.array_equal(array, np.round(array)):
                    raise DataError(f"mask {label} holds non-integer values; expected integer labels")
            else:
                array = np.asarray(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read mask {label}: {type(error).__name__}: {error}") from None
    if array.ndim != 2:
        raise DataError(f"mask {label} has shape {array.shape}; expected a 2D label map")
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.int64)
    return array if array.dtype in (np.uint8, np.uint16) else array.astype(np.int64)


def _label_values(mask: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer mask (bincount when the range is small: much faster than unique)."""
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(mask.min()), int(mask.max())
    if low >= 0 and high < 65536:
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=high + 1))
    return np.unique(mask).astype(np.int64)


def _check_labels(mask: np.ndarray, allowed: set[int] | None, label: str, case_id: str,
                  png: bool) -> tuple[np.ndarray, list[int]]:
    """Map a 0/255 binary mask to 0/1 and check the labels; returns (uint8 mask, label values)."""
    values = _label_values(mask)
    if png and values.size and set(values.tolist()) <= {0, 255} and 255 in values and (allowed is None or 255 not in allowed):
        mask = (mask == 255).astype(np.uint8)
        values = _label_values(mask)
    if values.size and values.min() < 0:
        raise DataError(f"case {case_id}: mask {label} holds negative label {int(values.min())}")
    if allowed is not None:
        bad = sorted(set(values.tolist()) - allowed)
        if bad:
            raise DataError(f"case {case_id}: mask {label} holds label(s) {bad} outside the declared labels {sorted(allowed)}")
    elif values.size and values.max() > MAX_FOLDER_LABEL:
        shown = values.tolist()[:8]
        raise DataError(
            f"case {case_id}: mask {label} holds values {shown}{'...' if values.size > 8 else ''}; expected label indices "
            f"0..{MAX_FOLDER_LABEL} (or a binary 0/255 mask)"
        )
    if values.size and values.max() > 255:
        raise DataError(f"case {case_id}: mask {label} holds label {int(values.max())}; at most 255 labels are supported")
    return mask.astype(np.uint8, copy=False), [int(v) for v in values]


# ------------------------------------------------------------------------------------------------
# listing cases
# ------------------------------------------------------------------------------------------------
def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _stem_map(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _visible_files(folder):
        suffix = path.suffix.lower()
        if suffix not in suffixes:
            continue
        stem = path.name[: -len(suffix)]
        if stem in found:
            raise DataError(f"two {what} files for case {stem}: {found[stem].name} and {path.name}")
        found[stem] = path
    return found


def _pairing_error(images: dict[str, Any], masks: dict[str, Any], image_dir: str, mask_dir: str) -> None:
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    problems = []
    if lonely_images:
        problems.append(f"image(s) without mask in {mask_dir}/: {', '.join(lonely_images[:5])}"
                        + (f" (and {len(lonely_images) - 5} more)" if len(lonely_images) > 5 else ""))
    if lonely_masks:
        problems.append(f"mask(s) without image in {image_dir}/: {', '.join(lonely_masks[:5])}"
                        + (f" (and {len(lonely_masks) - 5} more)" if len(lonely_masks) > 5 else ""))
    if problems:
        raise DataError("; ".join(problems))


def list_folder_cases(root: str | os.PathLike) -> list[CaseFiles]:
    """Cases of an ``images/`` + ``masks/`` folder, sorted by case id (pairing checked)."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise DataError(f"{root} has no images/ folder (expected images/<case>.png and masks/<case>.png)")
    images = _stem_map(image_dir, IMAGE_SUFFIXES, "image")
    masks = _stem_map(mask_dir, MASK_SUFFIXES, "mask") if mask_dir.is_dir() else None
    if masks is not None:
        lossy = [p.name for p in _visible_files(mask_dir) if p.suffix.lower() in (".jpg", ".jpeg")]
        if lossy:
            raise DataError(f"mask masks/{lossy[0]} is a JPEG (lossy compression alters labels); save masks as PNG")
        _pairing_error(images, masks, "images", "masks")
    if not images:
        raise DataError(f"empty data set: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return [CaseFiles(case, [images[case]], None if masks is None else masks[case], root) for case in sorted(images)]


def _inside(root: Path, relative: str, what: str) -> Path:
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise DataError(f"dataset.json names {what} {relative!r} with an absolute path; paths must be relative to {root}")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"dataset.json names {what} {relative!r} outside the data set folder {root}")
    return resolved


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path} must hold a JSON object")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in spec]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (nnU-Net v2 raw dataset.json)")
    if spec["file_ending"] not in NNUNET_ENDINGS:
        raise DataError(f"{path}: file_ending {spec['file_ending']!r} is not supported (use one of {', '.join(NNUNET_ENDINGS)})")
    if not isinstance(spec["channel_names"], dict) or not spec["channel_names"]:
        raise DataError(f"{path}: channel_names must be a non-empty object such as {{\"0\": \"CT\"}}")
    if not isinstance(spec["labels"], dict) or not spec["labels"]:
        raise DataError(f"{path}: labels must be a non-empty object such as {{\"background\": 0, \"lesion\": 1}}")
    if "ignore" in spec["labels"]:
        raise DataError(f"{path}: the nnU-Net 'ignore' label is not supported")
    return spec


def nnunet_labels(spec: dict[str, Any], where: str = "dataset.json") -> tuple[set[int], list[str]]:
    """Declared label values and the names indexed by label value (region labels: union of values)."""
    allowed: set[int] = set()
    names: dict[int, str] = {}
    for name, value in spec["labels"].items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise DataError(f"{where}: label {name!r} has value {value!r}; expected non-negative integers")
            allowed.add(item)
            if not isinstance(value, (list, tuple)):
                names[item] = str(name)
    if 0 not in allowed:
        raise DataError(f"{where}: labels must declare the background as 0")
    label_names = [names.get(i, f"label_{i}") for i in range(max(allowed) + 1)]
    return allowed, label_names


def list_nnunet_cases(root: str | os.PathLike, spec: dict[str, Any] | None = None) -> list[CaseFiles]:
    """Cases of an nnU-Net v2 raw data set (imagesTr/labelsTr or the explicit ``dataset`` entry)."""
    root = Path(root)
    spec = spec or _read_dataset_json(root)
    ending = spec["file_ending"]
    n_channels = len(spec["channel_names"])
    cases: list[CaseFiles] = []
    if "dataset" in spec:
        entries = spec["dataset"]
        if not isinstance(entries, dict):
            raise DataError(f"{root / 'dataset.json'}: 'dataset' must map case ids to {{'images': [...], 'label': ...}}")
        for case_id in sorted(entries):
            entry = entries[case_id]
            if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
                raise DataError(f"{root / 'dataset.json'}: case {case_id} needs 'images': [paths] (and 'label')")
            images = [_inside(root, str(p), f"image of case {case_id}") for p in entry["images"]]
            label = entry.get("label")
            mask = _inside(root, str(label), f"label of case {case_id}") if label is not None else None
            for path in images + ([mask] if mask else []):
                if not path.is_file():
                    raise DataError(f"case {case_id}: file {path.relative_to(root.resolve())} named in dataset.json does not exist")
            cases.append(CaseFiles(str(case_id), images, mask, root.resolve()))
    else:
        image_dir, label_dir = root / "imagesTr", root / "labelsTr"
        if not image_dir.is_dir():
            raise DataError(f"{root} has dataset.json but no imagesTr/ folder")
        pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
        channels: dict[str, dict[int, Path]] = {}
        for path in _visible_files(image_dir):
            if not path.name.endswith(ending):
                continue
            match = pattern.match(path.name)
            if not match:
                raise DataError(f"imagesTr/{path.name} does not end in _XXXX{ending} (the channel index, e.g. _0000)")
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
        masks = None
        if label_dir.is_dir():
            masks = {p.name[: -len(ending)]: p for p in _visible_files(label_dir) if p.name.endswith(ending)}
            _pairing_error(channels, masks, "imagesTr", "labelsTr")
        for case_id in sorted(channels):
            files = channels[case_id]
            present = set(files)
            rgb_png = ending == ".png" and n_channels == 3 and present == {0}  # one RGB file = 3 channels
            expected = {0} if rgb_png else set(range(n_channels))
            missing = sorted(expected - present)
            if missing:
                raise DataError(f"case {case_id} is missing channel file imagesTr/{case_id}_{missing[0]:04d}{ending} "
                                f"(dataset.json declares {n_channels} channel(s))")
            extra = sorted(present - expected)
            if extra:
                raise DataError(f"case {case_id}: imagesTr/{files[extra[0]].name} is channel {extra[0]}, "
                                f"but dataset.json declares {n_channels} channel(s)")
            cases.append(CaseFiles(case_id, [files[k] for k in sorted(files)], None if masks is None else masks[case_id], root))
    if not cases:
        raise DataError(f"empty data set: no cases in {root} (expected imagesTr/<case>_0000{ending})")
    return cases


def detect_format(path: str | os.PathLike) -> str:
    """``synthetic``, ``nnunet`` (dataset.json) or ``folder`` (images/); raises DataError otherwise."""
    if str(path) == "synthetic":
        return "synthetic"
    root = Path(path)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    if (root / "dataset.json").is_file():
        return "nnunet"
    if (root / "images").is_dir():
        return "folder"
    raise DataError(f"cannot tell the format of {root}: expected images/ + masks/ (folder) or dataset.json + imagesTr/ (nnU-Net v2)")


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------
def read_metadata(path: Path, case_ids: list[str]) -> dict[str, list[str]]:
    """``metadata.csv`` columns as per-case lists aligned with ``case_ids`` ('' where a case has no row)."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if "case_id" not in columns:
                raise DataError(f"{path} has no case_id column (columns: {', '.join(columns) or 'none'})")
            rows = {}
            for row in reader:
                case = str(row["case_id"] or "").strip()
                if case in rows:
                    raise DataError(f"{path} has two rows for case {case}")
                rows[case] = row
    except UnicodeDecodeError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    return {col: [str((rows.get(case) or {}).get(col) or "").strip() for case in case_ids] for col in columns}


def _default_groups(case_ids: list[str], metadata: dict[str, list[str]]) -> tuple[list[str], str | None]:
    for column in GROUP_COLUMNS:
        values = metadata.get(column)
        if values is not None:
            # a case without a value is its own group
            return [v if v != "" else f"case:{c}" for v, c in zip(values, case_ids)], column
    return list(case_ids), None


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _load_case(case: CaseFiles, size: int, mode: str, allowed: set[int] | None, n_channels: int | None):
    arrays = [read_image(p, label=case.rel(p)) for p in case.images]
    spatial = arrays[0].shape[1:]
    for path, array in zip(case.images[1:], arrays[1:]):
        if array.shape[1:] != spatial:
            raise DataError(f"case {case.case_id}: channel {case.rel(path)} is {_shape_text(array.shape[1:])}, "
                            f"{case.rel(case.images[0])} is {_shape_text(spatial)}")
    image = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
    if n_channels is not None and image.shape[0] != n_channels:
        first = case.rel(case.images[0])
        if image.shape[0] < n_channels and len(case.images) == 1 and "_0000" in first:
            missing = first.replace("_0000", "_0001")
            raise DataError(f"case {case.case_id} is missing channel file {missing} (dataset.json declares "
                            f"{n_channels} channel(s); {first} holds {image.shape[0]})")
        raise DataError(f"case {case.case_id}: {len(case.images)} image file(s) give {image.shape[0]} channel(s), "
                        f"dataset.json declares {n_channels}")
    if n_channels is None and image.shape[0] == 3 and np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2]):
        image = image[:1]  # grayscale stored as RGB: one channel (repeated again if the data set is colour)
    if not np.all(np.isfinite(image)):
        raise DataError(f"case {case.case_id}: image {case.rel(case.images[0])} holds NaN or infinite values")
    mask = None
    labels: list[int] = []
    if case.mask is not None:
        raw = read_mask(case.mask, label=case.rel(case.mask))
        if raw.shape != spatial:
            raise DataError(f"case {case.case_id}: mask {case.rel(case.mask)} is {_shape_text(raw.shape)}, "
                            f"image is {_shape_text(spatial)}")
        mask, labels = _check_labels(raw, allowed, case.rel(case.mask), case.case_id, png=case.mask.suffix.lower() == ".png")
    out_image, out_mask, info = to_training_size(image, mask, size, mode)
    return out_image, out_mask, info, tuple(int(s) for s in spatial), labels


def _load_cases(cases: list[CaseFiles], cfg: DataConfig, allowed: set[int] | None, n_channels: int | None,
                workers: int | None = None) -> dict[str, Any]:
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    load: Callable[[CaseFiles], Any] = lambda case: _load_case(case, cfg.size, cfg.resize_mode, allowed, n_channels)  # noqa: E731
    images = masks = None
    infos, sizes, labels_seen, dims = [], [], set(), None
    first_case = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (case, result) in enumerate(zip(cases, pool.map(load, cases))):
            image, mask, info, size, labels = result
            if images is None:
                first_case = case
                dims = image.ndim - 1
                images = np.empty((len(cases), *image.shape), dtype=np.float32)
                has_masks = cases[0].mask is not None
                masks = np.empty((len(cases), *image.shape[1:]), dtype=np.uint8) if has_masks else None
            if image.ndim - 1 != dims:
                raise DataError(f"case {case.case_id} is {image.ndim - 1}D, case {first_case.case_id} is {dims}D")
            if image.shape[0] != images.shape[1]:
                if n_channels is None and {image.shape[0], images.shape[1]} == {1, 3}:
                    # folder data mixing grayscale and colour images: grayscale ones are repeated to RGB
                    if image.shape[0] == 1:
                        image = np.repeat(image, 3, axis=0)
                    else:
                        images = np.repeat(images, 3, axis=1)
                else:
                    raise DataError(f"case {case.case_id} has {image.shape[0]} channel(s), case {first_case.case_id} has {images.shape[1]}")
            images[i] = image
            if masks is not None:
                masks[i] = mask
            infos.append(info)
            sizes.append(list(size))
            labels_seen.update(labels)
    return {"images": images, "masks": masks, "infos": infos, "sizes": sizes, "labels": labels_seen, "dims": dims}


def load_dataset(cfg: DataConfig | None = None) -> SegDataset:
    """Read a data set and bring it to training size.

    Args:
        cfg: path (``synthetic`` or a folder), format, training ``size``, ``resize_mode``, ``max_cases``.

    Returns:
        A :class:`SegDataset`: images ``(N, C, *[size]*d)`` float32 z-scored per image and channel,
        masks ``(N, *[size]*d)`` uint8 (or ``None`` without masks), cases sorted by id (the first
        ``max_cases`` kept), groups from ``metadata.csv`` (``patient_case`` / ``exam_id`` / ...) or the
        case ids, ``meta`` with the source, original sizes and label names.

    Raises:
        DataError: missing folder, empty data set, unreadable file, mask size ≠ image size, labels
            outside the declared set, image without mask (or the reverse), nnU-Net channel file
            missing, dataset.json paths outside the folder; the message names the case or file.
    """
    cfg = cfg or DataConfig()
    fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.path)
    if fmt == "synthetic":
        dataset = make_synthetic(cfg.synthetic)
        if cfg.max_cases is not None:
            dataset = dataset.subset(np.arange(min(cfg.max_cases, len(dataset))))
        return _resize_dataset(dataset, cfg)
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist" if not root.exists() else f"data path {root} is not a folder")
    allowed: set[int] | None = None
    n_channels: int | None = None
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    if fmt == "nnunet":
        spec = _read_dataset_json(root)
        allowed, label_names = nnunet_labels(spec, str(root / "dataset.json"))
        channel_names = [str(spec["channel_names"][k]) for k in sorted(spec["channel_names"], key=lambda k: int(k))]
        n_channels = len(channel_names)
        cases = list_nnunet_cases(root, spec)
        num_training = spec.get("numTraining")
        if isinstance(num_training, int) and num_training != len(cases):
            raise DataError(f"{root / 'dataset.json'}: numTraining is {num_training}, but {len(cases)} cases were found")
    elif fmt == "folder":
        cases = list_folder_cases(root)
    else:
        raise DataError(f"unknown data format {fmt!r}")
    if cfg.max_cases is not None:
        cases = cases[: cfg.max_cases]
    case_ids = [c.case_id for c in cases]
    loaded = _load_cases(cases, cfg, allowed, n_channels)
    if allowed is not None:
        num_classes = max(allowed) + 1
    else:
        num_classes = max(2, max(loaded["labels"], default=0) + 1)
        label_names = ["background"] + [f"label_{i}" for i in range(1, num_classes)]
        if num_classes == 2:
            label_names = ["background", "foreground"]
    num_classes = max(num_classes, 2)
    metadata: dict[str, list[str]] = {}
    metadata_path = root / "metadata.csv"
    if metadata_path.is_file():
        metadata = read_metadata(metadata_path, case_ids)
    groups, group_column = _default_groups(case_ids, metadata)
    if channel_names is None:
        channel_names = ["intensity"] if loaded["images"].shape[1] == 1 else ["R", "G", "B"][: loaded["images"].shape[1]]
    meta = {
        "source": str(root.resolve()),
        "format": fmt,
        "size": cfg.size,
        "resize_mode": cfg.resize_mode,
        "normalisation": NORMALISATION,
        "label_names": label_names,
        "channel_names": channel_names,
        "group_column": group_column,
        "labels_seen": sorted(int(v) for v in loaded["labels"]),
        "cases": {
            "original_size": loaded["sizes"],
            "image_files": [[c.rel(p) for p in c.images] for c in cases],
            "mask_file": [None if c.mask is None else c.rel(c.mask) for c in cases],
            "scale": [info["scale"] for info in loaded["infos"]],
            "pad": [info["pad"] for info in loaded["infos"]],
        },
        "metadata": metadata,
    }
    return SegDataset(images=loaded["images"], masks=loaded["masks"], case_ids=case_ids, groups=groups,
                      num_classes=num_classes, spatial_dims=int(loaded["dims"]), meta=meta)


def _resize_dataset(dataset: SegDataset, cfg: DataConfig) -> SegDataset:
    """Bring an in-memory data set (the synthetic one) to ``cfg.size`` / ``cfg.resize_mode``."""
    if dataset.spatial_shape == (cfg.size,) * dataset.spatial_dims:
        dataset.meta.update(size=cfg.size, resize_mode=cfg.resize_mode)
        return dataset
    images = np.empty((len(dataset), dataset.in_channels, *(cfg.size,) * dataset.spatial_dims), dtype=np.float32)
    masks = None if dataset.masks is None else np.empty((len(dataset), *(cfg.size,) * dataset.spatial_dims), dtype=np.uint8)
    scales, pads = [], []
    for i in range(len(dataset)):
        image, mask, info = to_training_size(dataset.images[i], None if masks is None else dataset.masks[i], cfg.size, cfg.resize_mode)
        images[i] = image
        if masks is not None:
            masks[i] = mask
        scales.append(info["scale"])
        pads.append(info["pad"])
    meta = dict(dataset.meta, size=cfg.size, resize_mode=cfg.resize_mode)
    meta["cases"] = dict(dataset.meta.get("cases", {}), scale=scales, pad=pads)
    return SegDataset(images=images, masks=masks, case_ids=dataset.case_ids, groups=dataset.groups,
                      num_classes=dataset.num_classes, spatial_dims=dataset.spatial_dims, meta=meta)
