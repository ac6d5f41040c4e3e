"""Proposal bank: exact round trips, on-disk size, streaming, crash safety, shards, scores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rndpo.bank import ProposalBank, load_scores, save_scores
from rndpo.errors import CheckpointError, RndpoError


def _random_bank_arrays(rng, n, k_max, spatial, num_classes, *, min_k=0):
    """Random masks (n, k_max, *spatial) and generator ids with a variable number of valid slots."""
    masks = rng.integers(0, num_classes, size=(n, k_max, *spatial), dtype=np.uint8)
    k = rng.integers(min_k, k_max + 1, size=n)
    generator_ids = np.full((n, k_max), -1, dtype=np.int16)
    for i in range(n):
        generator_ids[i, : k[i]] = rng.integers(0, 2, size=k[i])
    return masks, generator_ids, k


@pytest.mark.parametrize(
    "spatial, num_classes",
    [((13, 7), 2), ((5, 6, 3), 2), ((9, 11), 4), ((3, 5, 7), 3), ((8, 8), 2)],
)
def test_round_trip_exact(tmp_path, spatial, num_classes):
    rng = np.random.default_rng(0)
    n, k_max = 7, 5
    masks, generator_ids, k = _random_bank_arrays(rng, n, k_max, spatial, num_classes)
    with ProposalBank.create(
        tmp_path / "bank", case_ids=[f"c{i}" for i in range(n)], spatial_shape=spatial,
        num_classes=num_classes, k_max=k_max, generators=["mc-dropout", "tta"], meta={"seed": 3},
    ) as writer:
        writer.add(np.arange(4), masks[:4], generator_ids[:4])  # a chunk
        for i in range(4, n):  # then single images
            writer.add(i, masks[i], generator_ids[i])
    bank = ProposalBank.open(tmp_path / "bank", verify=True)
    assert len(bank) == n and bank.case_ids == [f"c{i}" for i in range(n)]
    assert bank.spatial_shape == spatial and bank.num_classes == num_classes and bank.k_max == k_max
    assert bank.meta == {"seed": 3} and bank.generators == ["mc-dropout", "tta"]
    np.testing.assert_array_equal(bank.num_proposals, k)
    for i in range(n):
        got = bank.masks(i)
        assert got.dtype == np.uint8 and got.shape == (k[i], *spatial)
        np.testing.assert_array_equal(got, masks[i, : k[i]])
        np.testing.assert_array_equal(bank.generator_ids(i), generator_ids[i, : k[i]])
    assert bank.valid.sum() == k.sum()


def test_empty_slots_compacted_and_duplicates_dropped(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 2, size=(1, 5, 6, 6), dtype=np.uint8)
    masks[0, 3] = masks[0, 0]  # duplicate of slot 0
    generator_ids = np.array([[0, -1, 1, 0, 1]], dtype=np.int16)
    with ProposalBank.create(tmp_path / "b", case_ids=["a"], spatial_shape=(6, 6), num_classes=2,
                             k_max=5, generators=["g0", "g1"]) as writer:
        writer.add([0], masks, generator_ids)
    bank = ProposalBank.open(tmp_path / "b")
    np.testing.assert_array_equal(bank.masks(0), masks[0, [0, 2, 4]])
    assert bank.generator_names(0) == ["g0", "g1", "g1"]
    assert bank.num_proposals[0] == 3


def test_bits_per_pixel_on_disk(tmp_path):
    rng = np.random.default_rng(2)
    n, k_max, spatial = 20, 6, (40, 40)
    masks = rng.integers(0, 2, size=(n, k_max, *spatial), dtype=np.uint8)
    with ProposalBank.create(tmp_path / "b", case_ids=[str(i) for i in range(n)], spatial_shape=spatial,
                             num_classes=2, k_max=k_max, generators=["g"]) as writer:
        writer.add(np.arange(n), masks)
    total = sum(f.stat().st_size for f in (tmp_path / "b").iterdir())
    bits_per_pixel = 8 * total / (n * k_max * np.prod(spatial))
    assert bits_per_pixel <= 1.1, bits_per_pixel


def test_iter_chunks_covers_all_and_is_memmapped(tmp_path):
    rng = np.random.default_rng(3)
    n, k_max, spatial = 11, 4, (9, 10)
    masks, generator_ids, k = _random_bank_arrays(rng, n, k_max, spatial, 2)
    with ProposalBank.create(tmp_path / "b", case_ids=[str(i) for i in range(n)], spatial_shape=spatial,
                             num_classes=2, k_max=k_max, generators=["a", "b"]) as writer:
        for i in rng.permutation(n):  # any order
            writer.add(int(i), masks[i], generator_ids[i])
    bank = ProposalBank.open(tmp_path / "b")
    assert isinstance(bank._parts[0].rows, np.memmap)
    seen = []
    for indices, chunk, valid in bank.iter_chunks(chunk_size=4):
        assert chunk.shape == (len(indices), k_max, *spatial) and valid.shape == (len(indices), k_max)
        for row, i in enumerate(indices):
            np.testing.assert_array_equal(valid[row], np.arange(k_max) < k[i])
            np.testing.assert_array_equal(chunk[row, : k[i]], masks[i, : k[i]])
            assert not chunk[row, k[i]:].any()
        seen.extend(indices.tolist())
    assert seen == list(range(n))


def test_pair_regions_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    for spatial, num_classes in (((7, 9), 2), ((3, 4, 5), 3)):
        n, k_max = 6, 4
        masks = rng.integers(0, num_classes, size=(n, k_max, *spatial), dtype=np.uint8)
        path = tmp_path / f"b{num_classes}"
        with ProposalBank.create(path, case_ids=[str(i) for i in range(n)], spatial_shape=spatial,
                                 num_classes=num_classes, k_max=k_max, generators=["g"], dedupe=False) as w:
            w.add(np.arange(n), masks)
        bank = ProposalBank.open(path)
        case, first, second = np.meshgrid(np.arange(n), np.arange(k_max), np.arange(k_max), indexing="ij")
        case, first, second = case.ravel(), first.ravel(), second.ravel()
        expected = [(masks[c, a] != masks[c, b]).sum() for c, a, b in zip(case, first, second)]
        np.testing.assert_array_equal(bank.pair_regions(case, first, second, block=7), expected)


def test_truncated_data_file_names_the_file(tmp_path):
    rng = np.random.default_rng(5)
    masks = rng.integers(0, 2, size=(3, 2, 8, 8), dtype=np.uint8)
    with ProposalBank.create(tmp_path / "b", case_ids=["a", "b", "c"], spatial_shape=(8, 8), num_classes=2,
                             k_max=2, generators=["g"], dedupe=False) as writer:
        writer.add(np.arange(3), masks)
    data = tmp_path / "b" / "masks.bin"
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="masks.bin"):
        ProposalBank.open(tmp_path / "b")


def test_corrupted_data_fails_verify(tmp_path):
    masks = np.zeros((2, 2, 8, 8), dtype=np.uint8)
    masks[:, 1, 2:5, 3:6] = 1
    with ProposalBank.create(tmp_path / "b", case_ids=["a", "b"], spatial_shape=(8, 8), num_classes=2,
                             k_max=2, generators=["g"]) as writer:
        writer.add([0, 1], masks)
    data = tmp_path / "b" / "masks.bin"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    ProposalBank.open(tmp_path / "b")  # sizes fine
    with pytest.raises(CheckpointError, match="masks.bin"):
        ProposalBank.open(tmp_path / "b", verify=True)


def test_crash_before_close_leaves_no_bank(tmp_path):
    masks = np.ones((1, 2, 4, 4), dtype=np.uint8)
    with pytest.raises(RuntimeError):
        with ProposalBank.create(tmp_path / "b", case_ids=["a", "b"], spatial_shape=(4, 4), num_classes=2,
                                 k_max=2, generators=["g"]) as writer:
            writer.add(0, masks[0])
            raise RuntimeError("crash")
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    # a writer that is never closed (process killed): still no bank at the path
    writer = ProposalBank.create(tmp_path / "c", case_ids=["a"], spatial_shape=(4, 4), num_classes=2,
                                 k_max=2, generators=["g"])
    writer.add(0, masks[0])
    assert not ProposalBank.exists(tmp_path / "c")
    with pytest.raises(CheckpointError, match=str(tmp_path / "c")):
        ProposalBank.open(tmp_path / "c")
    writer.abort()


def test_incomplete_folder_detected(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "masks.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="incomplete proposal bank .*b"):
        ProposalBank.open(tmp_path / "b")


def test_close_with_missing_cases_is_an_error(tmp_path):
    writer = ProposalBank.create(tmp_path / "b", case_ids=["a", "b"], spatial_shape=(4, 4), num_classes=2,
                                 k_max=1, generators=["g"])
    writer.add(0, np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(RndpoError, match="'b'"):
        writer.close()
    writer.add(1, np.zeros((1, 4, 4), np.uint8))
    assert len(writer.close()) == 2


def test_add_validation(tmp_path):
    writer = ProposalBank.create(tmp_path / "b", case_ids=["a", "b"], spatial_shape=(4, 4), num_classes=2,
                                 k_max=2, generators=["g", "h"])
    with pytest.raises(RndpoError, match="values"):
        writer.add(0, np.full((2, 4, 4), 2, np.uint8), np.zeros(2, np.int16))
    with pytest.raises(RndpoError, match="k_max"):
        writer.add(0, np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int16))
    with pytest.raises(RndpoError, match="shape"):
        writer.add(0, np.zeros((2, 5, 4), np.uint8), np.zeros(2, np.int16))
    with pytest.raises(RndpoError, match="generator_ids"):
        writer.add(0, np.zeros((2, 4, 4), np.uint8))
    writer.add(0, np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int16))
    with pytest.raises(RndpoError, match="already written"):
        writer.add(0, np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int16))
    writer.abort()


def test_overwrite(tmp_path):
    def write(value, **kwargs):
        with ProposalBank.create(tmp_path / "b", case_ids=["a"], spatial_shape=(4, 4), num_classes=2,
                                 k_max=1, generators=["g"], **kwargs) as writer:
            writer.add(0, np.full((1, 4, 4), value, np.uint8))

    write(0)
    with pytest.raises(CheckpointError, match="exists"):
        write(1)
    write(1, overwrite=True)
    assert ProposalBank.open(tmp_path / "b").masks(0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_shards_presented_as_one_bank(tmp_path):
    rng = np.random.default_rng(6)
    n, k_max, spatial, world = 10, 3, (6, 5), 3
    masks, generator_ids, k = _random_bank_arrays(rng, n, k_max, spatial, 2)
    ids = [f"case{i}" for i in range(n)]
    root = tmp_path / "bank"
    for rank in (2, 0, 1):  # ranks finish in any order
        with ProposalBank.create(ProposalBank.shard_path(root, rank), case_ids=ids, spatial_shape=spatial,
                                 num_classes=2, k_max=k_max, generators=["a", "b"],
                                 shard=(rank, world)) as writer:
            mine = np.arange(rank, n, world)
            writer.add(mine, masks[mine], generator_ids[mine])
    bank = ProposalBank.open(root, verify=True)
    assert bank.num_shards == world and len(bank) == n and bank.case_ids == ids
    np.testing.assert_array_equal(bank.num_proposals, k)
    for i in range(n):
        np.testing.assert_array_equal(bank.masks(i), masks[i, : k[i]])
        np.testing.assert_array_equal(bank.generator_ids(i), generator_ids[i, : k[i]])
    seen = [int(i) for indices, _, _ in bank.iter_chunks(4) for i in indices]
    assert seen == list(range(n))
    # a lone shard is not a whole bank
    with pytest.raises(CheckpointError, match="missing"):
        ProposalBank.open(ProposalBank.shard_path(root, 0))
    # a missing shard is detected
    os.rename(root / "shard_001", tmp_path / "away")
    with pytest.raises(CheckpointError, match="2 of 3 shards"):
        ProposalBank.open(root)


def test_shards_with_overlapping_cases_rejected(tmp_path):
    root = tmp_path / "bank"
    for rank in range(2):
        with ProposalBank.create(ProposalBank.shard_path(root, rank), case_ids=["a", "b"], spatial_shape=(4, 4),
                                 num_classes=2, k_max=1, generators=["g"], shard=(rank, 2)) as writer:
            writer.add(0, np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(CheckpointError, match="'a'"):
        ProposalBank.open(root)


def test_scores_round_trip_and_corruption(tmp_path):
    scores = np.array([[0.5, 0.25, np.nan], [0.1, 0.9, 0.3]], dtype=np.float32)
    path = save_scores(tmp_path / "scores_oracle", scores, {"judge": "oracle"})
    assert path.suffix == ".npy" and path.with_suffix(".json").is_file()
    loaded, meta = load_scores(path)
    np.testing.assert_array_equal(loaded, scores)
    assert loaded.dtype == np.float32 and meta == {"judge": "oracle"}
    assert json.loads(path.with_suffix(".json").read_text())["shape"] == [2, 3]
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 4)
    with pytest.raises(CheckpointError, match="scores_oracle.npy"):
        load_scores(path)
    with pytest.raises(RndpoError, match="inf"):
        save_scores(tmp_path / "s", np.array([[np.inf, 0.0]]))
