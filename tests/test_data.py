"""rndpo.data: synthetic generator, folder and nnU-Net readers, preprocessing, splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rndpo.cli import main as cli_main
from rndpo.config import DataConfig, SplitConfig, SyntheticConfig
from rndpo.data import SegDataset, Splits, load_dataset, make_splits, make_synthetic, to_training_size, zscore
from rndpo.errors import DataError

# ------------------------------------------------------------------------------------------------
# helpers: tiny data sets written into tmp_path
# ------------------------------------------------------------------------------------------------


def _blob_mask(shape: tuple[int, ...], center: tuple[float, ...], radius: float, label: int = 1) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    inside = np.linalg.norm(grid - np.asarray(center), axis=-1) <= radius
    return (inside * label).astype(np.uint8)


def _write_folder(root: Path, n: int = 6, shape: tuple[int, int] = (32, 32), rgb: bool = False, seed: int = 0,
                  metadata: bool = True, mask_scale: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """images/<case>.png + masks/<case>.png (+ metadata.csv with patient groups of two)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(n):
        case = f"case_{i:02d}"
        image = rng.integers(0, 256, size=(*shape, 3) if rgb else shape, dtype=np.uint8)
        mask = _blob_mask(shape, (shape[0] / 2 + i % 3, shape[1] / 2), min(shape) / 4)
        Image.fromarray(image).save(root / "images" / f"{case}.png")
        Image.fromarray(mask * mask_scale).save(root / "masks" / f"{case}.png")
        cases[case] = (image, mask)
    if metadata:
        lines = ["case_id,patient_case,side"] + [f"case_{i:02d},{i // 2},l" for i in range(n)]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return cases


def _write_nnunet_2d(root: Path, n: int = 4, shape: tuple[int, int] = (24, 24), channels: int = 2) -> dict:
    rng = np.random.default_rng(1)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    cases = {}
    for i in range(n):
        case = f"img_{i:03d}"
        chans = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(channels)]
        for k, chan in enumerate(chans):
            Image.fromarray(chan).save(root / "imagesTr" / f"{case}_{k:04d}.png")
        mask = _blob_mask(shape, (8, 8), 4, 1) + _blob_mask(shape, (17, 16), 4, 2)
        Image.fromarray(mask).save(root / "labelsTr" / f"{case}.png")
        cases[case] = (np.stack(chans), mask)
    spec = {"channel_names": {str(k): f"ch{k}" for k in range(channels)},
            "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": n, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return cases


def _write_nnunet_3d(root: Path, n: int = 3, shape: tuple[int, int, int] = (12, 12, 12)) -> dict:
    rng = np.random.default_rng(2)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    cases = {}
    for i in range(n):
        case = f"vol_{i:03d}"
        volume = rng.normal(100, 20, size=shape).astype(np.float32)
        mask = _blob_mask(shape, (6, 6, 5 + i % 2), 3.5)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
        cases[case] = (volume, mask)
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return cases


def _grouped_dataset(n: int = 60, group_size: int = 3) -> SegDataset:
    ids = [f"c{i:03d}" for i in range(n)]
    return SegDataset(images=np.zeros((n, 1, 4, 4), np.float32), masks=np.zeros((n, 4, 4), np.uint8), case_ids=ids,
                      groups=[f"g{i // group_size}" for i in range(n)], num_classes=2, spatial_dims=2,
                      meta={"metadata": {"site": [str(i % 4) for i in range(n)]}})


# ------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_varied():
    cfg = SyntheticConfig(n_images=40, size=48, seed=3)
    first, second = make_synthetic(cfg), make_synthetic(cfg)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)
    other = make_synthetic(SyntheticConfig(n_images=40, size=48, seed=4))
    assert not np.array_equal(first.masks, other.masks)
    assert first.images.shape == (40, 1, 48, 48) and first.images.dtype == np.float32
    assert first.masks.shape == (40, 48, 48) and first.masks.dtype == np.uint8
    assert set(np.unique(first.masks)) == {0, 1} and first.num_classes == 2 and first.spatial_dims == 2
    np.testing.assert_allclose(first.images.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(first.images.std(axis=(1, 2, 3)), 1, atol=1e-3)
    fractions = first.masks.mean(axis=(1, 2))
    assert fractions.min() > 0 and fractions.max() > 3 * fractions.min()  # every image has a lesion, sizes vary
    metadata = first.meta["metadata"]
    assert {"1", "2"} <= set(metadata["n_lesions"]) and "true" in metadata["low_contrast"]
    assert first.groups[0] == first.groups[1] != first.groups[2]  # two images per fake patient
    assert len(set(first.groups)) == 20


def test_synthetic_3d():
    data = make_synthetic(SyntheticConfig(n_images=4, size=16, spatial_dims=3, seed=1))
    assert data.images.shape == (4, 1, 16, 16, 16) and data.masks.shape == (4, 16, 16, 16)
    assert data.spatial_dims == 3 and all(m.any() for m in data.masks)


def test_load_synthetic_resizes_to_training_size():
    data = load_dataset(DataConfig(path="synthetic", size=32, max_cases=6, synthetic=SyntheticConfig(n_images=10, size=48)))
    assert data.images.shape == (6, 1, 32, 32) and data.masks.shape == (6, 32, 32)
    assert data.case_ids == [f"syn_{i:04d}" for i in range(6)]


# ------------------------------------------------------------------------------------------------
# readers: round trips
# ------------------------------------------------------------------------------------------------


def test_folder_round_trip(tmp_path):
    written = _write_folder(tmp_path, n=5)
    data = load_dataset(DataConfig(path=str(tmp_path), size=32))
    assert data.meta["format"] == "folder" and data.case_ids == sorted(written)
    assert data.images.shape == (5, 1, 32, 32) and data.num_classes == 2 and data.in_channels == 1
    for i, case in enumerate(data.case_ids):
        image, mask = written[case]
        np.testing.assert_allclose(data.images[i, 0], zscore(image[None].astype(np.float32))[0], atol=1e-5)
        assert np.array_equal(data.masks[i], mask)
    assert data.groups == ["0", "0", "1", "1", "2"] and data.meta["group_column"] == "patient_case"
    assert data.meta["metadata"]["side"] == ["l"] * 5
    assert data.meta["cases"]["original_size"][0] == [32, 32]


def test_folder_rgb_and_255_masks(tmp_path):
    written = _write_folder(tmp_path, n=3, rgb=True, mask_scale=255, metadata=False)
    data = load_dataset(DataConfig(path=str(tmp_path), size=32))
    assert data.in_channels == 3 and data.num_classes == 2
    assert np.array_equal(data.masks[0], written["case_00"][1])  # 255 read as 1
    np.testing.assert_allclose(data.images[0], zscore(written["case_00"][0].transpose(2, 0, 1).astype(np.float32)), atol=1e-5)
    assert data.groups == data.case_ids  # no metadata: every case is its own group


def test_folder_gray_stored_as_rgb_and_mixed_channels(tmp_path):
    written = _write_folder(tmp_path / "gray", n=2, metadata=False)
    gray = written["case_00"][0]
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray" / "images" / "case_00.png")
    data = load_dataset(DataConfig(path=str(tmp_path / "gray"), size=32))
    assert data.in_channels == 1  # an RGB file with equal channels is grayscale
    np.testing.assert_allclose(data.images[0, 0], zscore(gray[None].astype(np.float32))[0], atol=1e-5)
    colour = _write_folder(tmp_path / "mixed", n=3, rgb=True, metadata=False)
    Image.fromarray(gray).save(tmp_path / "mixed" / "images" / "case_01.png")
    data = load_dataset(DataConfig(path=str(tmp_path / "mixed"), size=32))
    assert data.in_channels == 3 and np.array_equal(data.images[1, 0], data.images[1, 2])
    np.testing.assert_allclose(data.images[2], zscore(colour["case_02"][0].transpose(2, 0, 1).astype(np.float32)), atol=1e-5)


def test_sixteen_bit_png_and_2d_nifti(tmp_path):
    _write_folder(tmp_path, n=1, metadata=False)
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    Image.fromarray(deep).save(tmp_path / "images" / "case_00.png")
    data = load_dataset(DataConfig(path=str(tmp_path), size=32))
    np.testing.assert_allclose(data.images[0, 0], zscore(deep[None].astype(np.float32))[0], atol=1e-5)

    root = tmp_path / "nifti2d"
    written = _write_nnunet_3d(root, n=2, shape=(16, 16, 1))
    data = load_dataset(DataConfig(path=str(root), size=16))
    assert data.spatial_dims == 2 and data.images.shape == (2, 1, 16, 16)
    assert np.array_equal(data.masks[0], written["vol_000"][1][..., 0])


def test_nnunet_rgb_png_single_file(tmp_path):
    written = _write_nnunet_2d(tmp_path, n=2, channels=1)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    spec["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    rgb = np.random.default_rng(0).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    for case in written:
        Image.fromarray(rgb).save(tmp_path / "imagesTr" / f"{case}_0000.png")
    data = load_dataset(DataConfig(path=str(tmp_path), size=24))
    assert data.in_channels == 3 and data.meta["channel_names"] == ["R", "G", "B"]


def test_folder_without_masks_is_unlabeled(tmp_path):
    _write_folder(tmp_path, n=2, metadata=False)
    for path in (tmp_path / "masks").iterdir():
        path.unlink()
    (tmp_path / "masks").rmdir()
    data = load_dataset(DataConfig(path=str(tmp_path), size=16))
    assert data.masks is None and len(data) == 2


def test_nnunet_2d_png_round_trip(tmp_path):
    written = _write_nnunet_2d(tmp_path, n=4, shape=(24, 24), channels=2)
    data = load_dataset(DataConfig(path=str(tmp_path), size=24))
    assert data.meta["format"] == "nnunet" and data.num_classes == 3 and data.in_channels == 2
    assert data.meta["label_names"] == ["background", "liver", "tumor"] and data.meta["channel_names"] == ["ch0", "ch1"]
    for i, case in enumerate(data.case_ids):
        image, mask = written[case]
        np.testing.assert_allclose(data.images[i], zscore(image.astype(np.float32)), atol=1e-5)
        assert np.array_equal(data.masks[i], mask)


def test_nnunet_3d_nifti_round_trip(tmp_path):
    written = _write_nnunet_3d(tmp_path, n=3, shape=(12, 12, 12))
    data = load_dataset(DataConfig(path=str(tmp_path), size=16, format="nnunet"))
    assert data.spatial_dims == 3 and data.images.shape == (3, 1, 16, 16, 16)
    native = load_dataset(DataConfig(path=str(tmp_path), size=16).model_copy(update={"size": 12}))
    for i, case in enumerate(native.case_ids):
        volume, mask = written[case]
        np.testing.assert_allclose(native.images[i, 0], zscore(volume[None])[0], atol=1e-5)
        assert np.array_equal(native.masks[i], mask)
    assert native.meta["cases"]["original_size"][0] == [12, 12, 12]


# ------------------------------------------------------------------------------------------------
# preprocessing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_resize_and_pad_keep_integer_labels(tmp_path, mode):
    _write_folder(tmp_path, n=2, shape=(24, 40), metadata=False)  # 40 wide, 24 high
    data = load_dataset(DataConfig(path=str(tmp_path), size=32, resize_mode=mode))
    assert data.images.shape == (2, 1, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) == {0, 1}
    pad = data.meta["cases"]["pad"][0]
    if mode == "pad":
        assert pad == [[6, 7], [0, 0]]  # 24 * 32/40 = 19 rows, padded to 32
        assert not data.masks[:, :6].any() and np.all(data.images[:, :, :6] == 0)
    else:
        assert pad == [[0, 0], [0, 0]]


def test_to_training_size_3d_pad():
    image = np.random.default_rng(0).normal(size=(2, 10, 20, 16)).astype(np.float32)
    mask = np.zeros((10, 20, 16), np.int64)
    mask[3:7, 5:15, 4:12] = 2
    out, out_mask, info = to_training_size(image, mask, 16, "pad")
    assert out.shape == (2, 16, 16, 16) and out_mask.shape == (16, 16, 16)
    assert set(np.unique(out_mask)) == {0, 2} and info["pad"][1] == [0, 0]


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------


def test_splits_disjoint_cover_grouped_deterministic():
    data = _grouped_dataset(60, group_size=3)
    cfg = SplitConfig(labeled=0.25, val=0.1, test=0.2, seed=5)
    splits = make_splits(data, cfg)
    ids = splits.all_ids()
    assert len(ids) == len(set(ids)) == 60 and set(ids) == set(data.case_ids)
    group_of = dict(zip(data.case_ids, data.groups))
    owners: dict[str, str] = {}
    for name in ("labeled", "pool", "val", "test"):
        for case in getattr(splits, name):
            assert owners.setdefault(group_of[case], name) == name
    assert splits.counts["test"] == 12 and splits.counts["val"] == 6 and splits.counts["labeled"] == 9
    assert make_splits(data, cfg).to_dict() == splits.to_dict()
    assert make_splits(data, cfg.model_copy(update={"seed": 6})).test != splits.test


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=8, max_size=40), seed=st.integers(0, 10**6),
       labeled=st.one_of(st.floats(0.05, 0.9), st.integers(1, 3)))
def test_splits_property(sizes, seed, labeled):
    groups = [f"g{i}" for i, size in enumerate(sizes) for _ in range(size)]
    n = len(groups)
    data = SegDataset(images=np.zeros((n, 1, 2, 2), np.float32), masks=None, case_ids=[f"c{i}" for i in range(n)],
                      groups=groups, num_classes=2, spatial_dims=2)
    splits = make_splits(data, SplitConfig(labeled=labeled, val=0.1, test=0.2, seed=seed))
    assert sorted(splits.all_ids()) == sorted(data.case_ids)
    owner = {}
    for name in ("labeled", "pool", "val", "test"):
        for case in getattr(splits, name):
            assert owner.setdefault(groups[int(case[1:])], name) == name
    assert splits.counts["labeled"] >= 1 and splits.counts["test"] >= 1


def test_splits_label_budget_count_and_group_column():
    data = _grouped_dataset(40, group_size=1)
    splits = make_splits(data, SplitConfig(labeled=7, val=0.1, test=0.2))
    assert splits.counts == {"labeled": 7, "pool": 21, "val": 4, "test": 8}
    by_site = make_splits(data, SplitConfig(labeled=0.5, val=0.0, test=0.25, group_column="site"))
    sites = dict(zip(data.case_ids, data.meta["metadata"]["site"]))
    assert len({sites[c] for c in by_site.test}) == 1 and not by_site.val
    with pytest.raises(DataError, match="available columns: site"):
        make_splits(data, SplitConfig(group_column="patient"))
    with pytest.raises(DataError, match="exceeds"):
        make_splits(data, SplitConfig(labeled=100))


def test_splits_save_load_select(tmp_path):
    data = make_synthetic(SyntheticConfig(n_images=20, size=16))
    splits = make_splits(data, SplitConfig(labeled=4))
    path = splits.save(tmp_path / "run" / "splits.json")
    saved = json.loads(path.read_text())
    assert saved["counts"] == splits.counts and saved["config"]["labeled"] == 4
    loaded = Splits.load(path)
    assert loaded.to_dict() == splits.to_dict()
    labeled = loaded.subsets(data)["labeled"]
    assert labeled.case_ids == loaded.labeled and labeled.images.shape == (4, 1, 16, 16)
    assert labeled.meta["metadata"]["patient_id"] == [data.groups[data.case_ids.index(c)] for c in loaded.labeled]
    with pytest.raises(DataError, match="nope"):
        data.select(["nope"])
    (tmp_path / "bad.json").write_text('{"labeled": []}')
    with pytest.raises(DataError, match="pool"):
        Splits.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------
# bad input: each a DataError naming the case or file
# ------------------------------------------------------------------------------------------------


def _load(path: Path, **kwargs) -> SegDataset:
    return load_dataset(DataConfig(path=str(path), size=16, **kwargs))


def test_bad_folder_inputs(tmp_path):
    root = tmp_path / "corrupt"
    _write_folder(root, n=3, metadata=False)
    (root / "images" / "case_01.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="case_01.png"):
        _load(root)

    root = tmp_path / "size"
    _write_folder(root, n=2, shape=(80, 120), metadata=False)
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(root / "masks" / "case_01.png")
    with pytest.raises(DataError, match=r"mask masks/case_01.png is 100x80, image is 120x80"):
        _load(root)

    root = tmp_path / "labels"
    _write_folder(root, n=2, metadata=False)
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(root / "masks" / "case_00.png")
    with pytest.raises(DataError, match="case_00"):
        _load(root)

    root = tmp_path / "no_mask"
    _write_folder(root, n=3, metadata=False)
    (root / "masks" / "case_02.png").unlink()
    with pytest.raises(DataError, match="without mask.*case_02"):
        _load(root)

    root = tmp_path / "no_image"
    _write_folder(root, n=3, metadata=False)
    (root / "images" / "case_00.png").unlink()
    with pytest.raises(DataError, match="without image.*case_00"):
        _load(root)

    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with pytest.raises(DataError, match="empty data set"):
        _load(root)

    root = tmp_path / "jpeg_mask"
    _write_folder(root, n=2, metadata=False)
    Image.open(root / "masks" / "case_01.png").convert("L").save(root / "masks" / "case_01.jpg")
    (root / "masks" / "case_01.png").unlink()
    with pytest.raises(DataError, match="case_01.jpg is a JPEG"):
        _load(root)

    root = tmp_path / "metadata"
    _write_folder(root, n=2, metadata=False)
    (root / "metadata.csv").write_text("case_id,patient\ncase_00,1\ncase_00,2\n")
    with pytest.raises(DataError, match="two rows for case case_00"):
        _load(root)
    (root / "metadata.csv").write_text("id,patient\ncase_00,1\n")
    with pytest.raises(DataError, match="no case_id column"):
        _load(root)

    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path / "missing")
    with pytest.raises(DataError, match="cannot tell the format"):
        _load(tmp_path)


def test_bad_nnunet_inputs(tmp_path):
    root = tmp_path / "labels"
    _write_nnunet_2d(root, n=2, channels=1)
    Image.fromarray(np.full((24, 24), 3, np.uint8)).save(root / "labelsTr" / "img_001.png")
    with pytest.raises(DataError, match=r"img_001.*\[3\]"):
        _load(root)

    root = tmp_path / "channel"
    _write_nnunet_2d(root, n=2, channels=2)
    (root / "imagesTr" / "img_001_0001.png").unlink()
    with pytest.raises(DataError, match="img_001 is missing channel file imagesTr/img_001_0001.png"):
        _load(root)

    for bad_path, message in [("/etc/passwd", "absolute"), ("../outside.png", "outside")]:
        root = tmp_path / f"traversal_{message}"
        _write_nnunet_2d(root, n=1, channels=1)
        spec = json.loads((root / "dataset.json").read_text())
        spec["dataset"] = {"img_000": {"images": [bad_path], "label": "labelsTr/img_000.png"}}
        (root / "dataset.json").write_text(json.dumps(spec))
        with pytest.raises(DataError, match=message):
            _load(root)

    root = tmp_path / "rgb_missing"
    _write_nnunet_2d(root, n=1, channels=1)
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="img_000 is missing channel file imagesTr/img_000_0001.png"):
        _load(root)

    root = tmp_path / "corrupt_nifti"
    _write_nnunet_3d(root, n=2)
    (root / "imagesTr" / "vol_001_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="vol_001_0000.nii.gz"):
        _load(root)

    root = tmp_path / "3d_size"
    _write_nnunet_3d(root, n=2)
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 10), np.uint8), np.eye(4)), root / "labelsTr" / "vol_001.nii.gz")
    with pytest.raises(DataError, match=r"vol_001.*12x12x10.*12x12x12"):
        _load(root)


# ------------------------------------------------------------------------------------------------
# CLI and real data
# ------------------------------------------------------------------------------------------------


def test_cli_data_info(tmp_path, capsys):
    _write_folder(tmp_path / "ok", n=4)
    assert cli_main(["data-info", "--data", str(tmp_path / "ok"), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "cases" in out and "patient_case" in out
    assert cli_main(["data-info", "--data", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.realdata
def test_shared_data(shared_data):
    for name, column in [("busbra", "patient_case"), ("hc18", "exam_id")]:
        data = load_dataset(DataConfig(path=str(shared_data / name), size=64, max_cases=40))
        assert data.images.shape == (40, 1, 64, 64) and data.masks.shape == (40, 64, 64)
        assert data.num_classes == 2 and set(np.unique(data.masks)) == {0, 1}
        assert all(m.any() for m in data.masks) and data.meta["group_column"] == column
        splits = make_splits(data, SplitConfig(labeled=0.2))
        group_of = dict(zip(data.case_ids, data.meta["metadata"][column]))
        split_groups = [{group_of[c] for c in getattr(splits, s)} for s in ("labeled", "pool", "val", "test")]
        assert sum(len(g) for g in split_groups) == len(set().union(*split_groups))  # no group in two splits
        assert len(set(data.groups)) < 40  # some patients / exams have several images
        assert splits.config["group_column_used"] == column
