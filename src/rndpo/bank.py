"""On-disk proposal bank: K candidate masks per unlabeled image, bit-packed and memory-mapped.

A bank is a folder::

    bank/
      header.json   format version, case ids, spatial shape, num_classes, k_max, generator names,
                    storage kind, sizes and CRC-32 of the two files below, user ``meta``
      masks.bin     raw rows, one per stored proposal: binary masks bit-packed with
                    ``numpy.packbits`` along the flattened spatial axis (ceil(P / 8) bytes for P
                    pixels), multi-class masks as uint8 labels (P bytes)
      index.npz     start (N,) int64 first row of each image, count (N,) int32 proposals per
                    image (K_i, after empty slots and duplicates are dropped; -1: not written by
                    this shard), generator_ids (rows,) int16 index into the generator names

Rows are only read through ``numpy.memmap``, so a pool of 10,000 images at 256² never has to be in
memory. A bank is written by :meth:`ProposalBank.create` into a hidden temporary folder that is
renamed onto the final path only by :meth:`BankWriter.close`: a crash leaves no half bank, and a
folder without a valid header is reported as incomplete (:class:`~rndpo.errors.CheckpointError`).

Several ranks can each write one shard (``root/shard_000``, ``root/shard_001``, … created with
``shard=(rank, world_size)``, each covering any subset of the pool); :meth:`ProposalBank.open` on
``root`` presents them as one bank ordered by case index.

Judge scores live next to the bank: :func:`save_scores` / :func:`load_scores` (``.npy`` + ``.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rndpo.errors import CheckpointError, RndpoError
from rndpo.io import atomic_path, to_jsonable

__all__ = ["ProposalBank", "BankWriter", "save_scores", "load_scores", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_FORMAT = "rndpo-proposal-bank"
_HEADER = "header.json"
_DATA = "masks.bin"
_INDEX = "index.npz"
_CRC_BLOCK = 1 << 24  # bytes read at a time when verifying a checksum


def _crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class BankWriter:
    """Writes one proposal bank (or one shard of it); obtained from :meth:`ProposalBank.create`.

    Usable as a context manager: the bank is finalised on a clean exit and discarded when the body
    raises. Cases may be added in any order, each exactly once.
    """

    def __init__(
        self,
        path: Path,
        *,
        case_ids: list[str],
        spatial_shape: tuple[int, ...],
        num_classes: int,
        k_max: int,
        generators: list[str],
        meta: dict,
        shard: tuple[int, int] | None,
        dedupe: bool,
        overwrite: bool,
    ) -> None:
        self.path = path
        self.case_ids = case_ids
        self.spatial_shape = spatial_shape
        self.num_classes = num_classes
        self.k_max = k_max
        self.generators = generators
        self.meta = meta
        self.shard = shard
        self.dedupe = dedupe
        self.overwrite = overwrite
        self.binary = num_classes == 2
        self.num_pixels = int(np.prod(spatial_shape))
        self.row_bytes = (self.num_pixels + 7) // 8 if self.binary else self.num_pixels

        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        self._data = open(self._tmp / _DATA, "wb")
        self._crc = 0
        self._rows = 0
        self._start = np.zeros(len(case_ids), dtype=np.int64)
        self._count = np.full(len(case_ids), -1, dtype=np.int32)
        self._generator_ids: list[np.ndarray] = []
        self._duplicates = 0
        self._closed = False

    # ------------------------------------------------------------------ writing
    def add(
        self,
        case_index: int | Sequence[int] | np.ndarray,
        masks: np.ndarray,
        generator_ids: np.ndarray | None = None,
    ) -> None:
        """Store the proposals of one image or of a chunk of images.

        Args:
            case_index: index into ``case_ids`` of one image, or (n,) indices of a chunk.
            masks: (n, K, *spatial) integer/bool label maps with values in [0, num_classes), K ≤ k_max
                (for a single ``case_index`` also (K, *spatial)).
            generator_ids: (n, K) int, index into ``generators`` per proposal, -1 for an empty slot
                (its mask is ignored). ``None``: every slot valid, allowed with one generator only.

        Empty slots are dropped and the remaining proposals compacted to slots 0..K_i-1 in their
        given order; with ``dedupe`` an exact duplicate of an earlier proposal of the same image is
        dropped too. K_i (possibly 0) is what :attr:`ProposalBank.num_proposals` reports.

        Raises:
            RndpoError: bad shapes, values, indices, or a case written twice.
        """
        if self._closed:
            raise RndpoError(f"bank writer for {self.path} is already closed")
        masks = np.asarray(masks)
        single = np.ndim(case_index) == 0
        indices = np.atleast_1d(np.asarray(case_index))
        if not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 1:
            raise RndpoError(f"case_index must be an int or a 1-D integer array, got {case_index!r}")
        nd = len(self.spatial_shape)
        if single and masks.ndim == nd + 1:
            masks = masks[None]
        if masks.ndim != nd + 2 or tuple(masks.shape[2:]) != self.spatial_shape:
            raise RndpoError(
                f"masks must have shape (n, K, *{self.spatial_shape}), got {masks.shape}"
            )
        n, k = masks.shape[:2]
        if n != len(indices):
            raise RndpoError(f"masks hold {n} images but case_index names {len(indices)}")
        if k > self.k_max:
            raise RndpoError(f"masks hold K={k} proposals per image, more than k_max={self.k_max}")
        if generator_ids is None:
            if len(self.generators) != 1:
                raise RndpoError("generator_ids is required when the bank has several generators")
            generator_ids = np.zeros((n, k), dtype=np.int16)
        generator_ids = np.asarray(generator_ids)
        if single and generator_ids.ndim == 1:
            generator_ids = generator_ids[None]
        if generator_ids.shape != (n, k) or not np.issubdtype(generator_ids.dtype, np.integer):
            raise RndpoError(f"generator_ids must be an integer array of shape {(n, k)}, got "
                             f"{generator_ids.dtype} {generator_ids.shape}")
        if generator_ids.size and (generator_ids.min() < -1 or generator_ids.max() >= len(self.generators)):
            raise RndpoError(f"generator_ids must lie in [-1, {len(self.generators)}), got values in "
                             f"[{generator_ids.min()}, {generator_ids.max()}]")
        if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
            raise RndpoError(f"masks must be integer or bool label maps, got dtype {masks.dtype}")
        for row, case in enumerate(indices):
            case = int(case)
            if not 0 <= case < len(self.case_ids):
                raise RndpoError(f"case_index {case} out of range for {len(self.case_ids)} cases")
            if self._count[case] >= 0:
                raise RndpoError(f"case {self.case_ids[case]!r} (index {case}) was already written to {self.path}")
            keep = generator_ids[row] >= 0
            proposals = masks[row][keep].reshape(int(keep.sum()), self.num_pixels)
            if proposals.size and (proposals.min() < 0 or proposals.max() >= self.num_classes):
                raise RndpoError(
                    f"case {self.case_ids[case]!r}: mask values must lie in [0, {self.num_classes}), got "
                    f"[{proposals.min()}, {proposals.max()}]"
                )
            proposals = proposals.astype(np.uint8, copy=False)
            rows = np.packbits(proposals, axis=-1) if self.binary else np.ascontiguousarray(proposals)
            gids = generator_ids[row][keep].astype(np.int16)
            if self.dedupe and len(rows) > 1:
                seen: set[bytes] = set()
                unique = []
                for j, packed in enumerate(rows):
                    key = packed.tobytes()
                    if key not in seen:
                        seen.add(key)
                        unique.append(j)
                self._duplicates += len(rows) - len(unique)
                rows, gids = rows[unique], gids[unique]
            buffer = np.ascontiguousarray(rows, dtype=np.uint8).tobytes()
            self._data.write(buffer)
            self._crc = zlib.crc32(buffer, self._crc)
            self._start[case] = self._rows
            self._count[case] = len(rows)
            self._rows += len(rows)
            self._generator_ids.append(gids)

    @property
    def num_written(self) -> int:
        """Number of cases written so far."""
        return int((self._count >= 0).sum())

    # ------------------------------------------------------------------ finishing
    def close(self) -> "ProposalBank":
        """Finalise the bank atomically (index, header, rename) and return it opened for reading.

        Raises:
            RndpoError: a non-shard bank with cases never written (the writer stays open).
            CheckpointError: ``path`` exists already and ``overwrite`` was not set.
        """
        if self._closed:
            raise RndpoError(f"bank writer for {self.path} is already closed")
        missing = np.flatnonzero(self._count < 0)
        if self.shard is None and len(missing):
            names = ", ".join(repr(self.case_ids[i]) for i in missing[:5])
            raise RndpoError(
                f"bank {self.path}: {len(missing)} of {len(self.case_ids)} cases never written "
                f"(first: {names}); add them or call abort()"
            )
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        generator_ids = (np.concatenate(self._generator_ids) if self._generator_ids
                         else np.zeros(0, dtype=np.int16))
        with open(self._tmp / _INDEX, "wb") as handle:
            np.savez(handle, start=self._start, count=self._count, generator_ids=generator_ids)
            handle.flush()
            os.fsync(handle.fileno())
        header = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "storage": "bitpacked" if self.binary else "labels",
            "num_images": len(self.case_ids),
            "case_ids": self.case_ids,
            "spatial_shape": list(self.spatial_shape),
            "num_classes": self.num_classes,
            "k_max": self.k_max,
            "generators": self.generators,
            "row_bytes": self.row_bytes,
            "num_rows": self._rows,
            "num_written": self.num_written,
            "dedupe": self.dedupe,
            "duplicates_dropped": self._duplicates,
            "shard": None if self.shard is None else {"rank": self.shard[0], "world_size": self.shard[1]},
            "files": {
                _DATA: {"size": self._rows * self.row_bytes, "crc32": self._crc},
                _INDEX: {"size": (self._tmp / _INDEX).stat().st_size, "crc32": _crc32_file(self._tmp / _INDEX)},
            },
            "meta": self.meta,
        }
        with atomic_path(self._tmp / _HEADER) as tmp:
            tmp.write_text(json.dumps(to_jsonable(header), indent=1, allow_nan=False) + "\n")
        _fsync_dir(self._tmp)
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise CheckpointError(f"proposal bank {self.path} exists already (pass overwrite=True)")
            trash = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, trash / "old")
            os.replace(self._tmp, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        self._closed = True
        if self.shard is not None:
            return ProposalBank._open_single(self.path, allow_partial=True)
        return ProposalBank.open(self.path)

    def abort(self) -> None:
        """Discard everything written; ``path`` is left untouched."""
        if not self._data.closed:
            self._data.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "BankWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Part:
    """One complete bank folder (a whole bank or one shard), memory-mapped."""

    def __init__(self, path: Path, header: dict, index: dict[str, np.ndarray], rows: np.ndarray) -> None:
        self.path = path
        self.header = header
        self.start = index["start"]
        self.count = index["count"]
        self.generator_ids = index["generator_ids"]
        self.rows = rows  # (num_rows, row_bytes) uint8 memmap


class ProposalBank:
    """Read access to a proposal bank (or to a folder of shards, presented as one bank).

    Attributes:
        path: the bank folder.
        case_ids: (N,) case ids in bank order (the case index is the position in this list).
        spatial_shape: (H, W) or (D, H, W).
        num_classes: including background; 2 → binary, stored bit-packed.
        k_max: number of proposal slots per image (scores have shape (N, k_max)).
        generators: generator names; ``generator_ids`` index into it.
        num_proposals: (N,) int32, K_i valid proposals per image (slots 0..K_i-1).
        meta: the ``meta`` dict given at creation (of shard 0 for a sharded bank).
    """

    def __init__(self, path: Path, parts: list[_Part]) -> None:
        first = parts[0].header
        self.path = path
        self.case_ids: list[str] = list(first["case_ids"])
        self.spatial_shape: tuple[int, ...] = tuple(first["spatial_shape"])
        self.num_classes: int = int(first["num_classes"])
        self.k_max: int = int(first["k_max"])
        self.generators: list[str] = list(first["generators"])
        self.meta: dict = first.get("meta", {})
        self.binary = first["storage"] == "bitpacked"
        self.num_pixels = int(np.prod(self.spatial_shape))
        self.row_bytes = int(first["row_bytes"])
        self._parts = parts
        n = len(self.case_ids)
        self._part_of = np.full(n, -1, dtype=np.int32)
        self._start = np.zeros(n, dtype=np.int64)
        self.num_proposals = np.zeros(n, dtype=np.int32)
        for number, part in enumerate(parts):
            written = part.count >= 0
            clash = written & (self._part_of >= 0)
            if clash.any():
                case = int(np.flatnonzero(clash)[0])
                raise CheckpointError(
                    f"sharded bank {path}: case {self.case_ids[case]!r} is written by both "
                    f"{parts[self._part_of[case]].path.name} and {part.path.name}"
                )
            self._part_of[written] = number
            self._start[written] = part.start[written]
            self.num_proposals[written] = part.count[written]
        missing = np.flatnonzero(self._part_of < 0)
        if len(missing):
            names = ", ".join(repr(self.case_ids[i]) for i in missing[:5])
            raise CheckpointError(f"incomplete proposal bank {path}: {len(missing)} of {n} cases missing "
                                  f"(first: {names}); a shard is missing or unfinished")

    # ------------------------------------------------------------------ creating / opening
    @staticmethod
    def create(
        path: str | os.PathLike,
        *,
        case_ids: Sequence[str],
        spatial_shape: Sequence[int],
        num_classes: int,
        k_max: int,
        generators: Sequence[str],
        meta: dict | None = None,
        shard: tuple[int, int] | None = None,
        dedupe: bool = True,
        overwrite: bool = False,
    ) -> BankWriter:
        """Start writing a bank at ``path`` (nothing appears there until :meth:`BankWriter.close`).

        Args:
            path: the bank folder; for a shard, ``ProposalBank.shard_path(root, rank)``.
            case_ids: ids of the whole pool, in bank order (case index = position).
            spatial_shape: (H, W) or (D, H, W) of every mask.
            num_classes: including background (binary: 2 → bit-packed storage).
            k_max: proposal slots per image.
            generators: generator names (e.g. ``["mc-dropout", "tta"]``).
            meta: JSON-serialisable provenance (model, config hash, seeds, ...).
            shard: ``(rank, world_size)`` when this writer covers only part of the pool.
            dedupe: drop exact duplicate proposals within an image.
            overwrite: replace an existing bank at ``path`` on close.

        Raises:
            RndpoError: an argument out of range (named in the message).
        """
        case_ids = [str(c) for c in case_ids]
        spatial_shape = tuple(int(s) for s in spatial_shape)
        generators = [str(g) for g in generators]
        if len(set(case_ids)) != len(case_ids):
            raise RndpoError("case_ids must be unique")
        if not 1 <= len(spatial_shape) <= 3 or min(spatial_shape, default=0) < 1:
            raise RndpoError(f"spatial_shape must be 1 to 3 positive sizes, got {spatial_shape}")
        if not 2 <= int(num_classes) <= 256:
            raise RndpoError(f"num_classes must lie in [2, 256], got {num_classes}")
        if int(k_max) < 1:
            raise RndpoError(f"k_max must be ≥ 1, got {k_max}")
        if not generators or len(generators) > np.iinfo(np.int16).max:
            raise RndpoError("generators must name at least one generator")
        if shard is not None:
            rank, world_size = (int(v) for v in shard)
            if not 0 <= rank < world_size:
                raise RndpoError(f"shard must be (rank, world_size) with 0 ≤ rank < world_size, got {shard}")
            shard = (rank, world_size)
        try:
            json.dumps(to_jsonable(meta or {}), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise RndpoError(f"bank meta must be JSON-serialisable: {error}") from None
        return BankWriter(
            Path(path), case_ids=case_ids, spatial_shape=spatial_shape, num_classes=int(num_classes),
            k_max=int(k_max), generators=generators, meta=dict(meta or {}), shard=shard, dedupe=dedupe,
            overwrite=overwrite,
        )

    @staticmethod
    def shard_path(root: str | os.PathLike, rank: int) -> Path:
        """Folder of rank ``rank``'s shard under ``root``: ``root/shard_{rank:03d}``."""
        return Path(root) / f"shard_{int(rank):03d}"

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """True when ``path`` holds a finished bank or shard folders (not checked further)."""
        path = Path(path)
        return (path / _HEADER).is_file() or any(path.glob("shard_*/" + _HEADER))

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False) -> "ProposalBank":
        """Open a bank folder, or a folder of ``shard_*`` banks presented as one bank.

        Sizes of every file are always checked; ``verify`` also checks the CRC-32 of the mask data
        (reads it all once).

        Raises:
            CheckpointError: missing, incomplete, truncated or inconsistent bank, naming the path/file.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"no proposal bank at {path} (folder not found)")
        if (path / _HEADER).exists():
            part = cls._open_single(path, verify=verify)
            return cls(path, [part])
        shard_dirs = sorted(p for p in path.glob("shard_*") if p.is_dir())
        if not shard_dirs:
            raise CheckpointError(
                f"incomplete proposal bank {path}: no {_HEADER} and no shard_* folders "
                "(a writer did not finish)"
            )
        parts = [cls._open_single(d, verify=verify, allow_partial=True) for d in shard_dirs]
        first = parts[0].header
        keys = ("storage", "case_ids", "spatial_shape", "num_classes", "k_max", "generators", "row_bytes")
        for part in parts[1:]:
            for key in keys:
                if part.header[key] != first[key]:
                    raise CheckpointError(
                        f"sharded bank {path}: {part.path.name} disagrees with {parts[0].path.name} on {key!r}"
                    )
        world_sizes = {p.header["shard"]["world_size"] for p in parts if p.header.get("shard")}
        if len(world_sizes) > 1:
            raise CheckpointError(f"sharded bank {path}: shards disagree on world_size ({sorted(world_sizes)})")
        if world_sizes and len(parts) != next(iter(world_sizes)):
            found = ", ".join(d.name for d in shard_dirs)
            raise CheckpointError(
                f"incomplete sharded bank {path}: {len(parts)} of {next(iter(world_sizes))} shards found ({found})"
            )
        return cls(path, parts)

    @staticmethod
    def _open_single(path: Path, *, verify: bool = False, allow_partial: bool = False) -> _Part:
        header_path = path / _HEADER
        if not header_path.is_file():
            raise CheckpointError(f"incomplete proposal bank {path}: {_HEADER} missing (a writer did not finish)")
        try:
            header = json.loads(header_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"unreadable bank header {header_path}: {error}") from None
        if header.get("format") != _FORMAT:
            raise CheckpointError(f"{header_path} is not a proposal bank header")
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{header_path}: bank format version {header.get('format_version')} is not supported "
                f"(this rndpo reads version {FORMAT_VERSION})"
            )
        for name in (_DATA, _INDEX):
            file = path / name
            expected = header["files"][name]
            if not file.is_file():
                raise CheckpointError(f"proposal bank file missing: {file}")
            size = file.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(
                    f"proposal bank file {file} has {size} bytes, expected {expected['size']} (truncated or corrupted)"
                )
            if (verify or name == _INDEX) and _crc32_file(file) != expected["crc32"]:
                raise CheckpointError(f"proposal bank file {file} fails its CRC-32 check (corrupted)")
        with np.load(path / _INDEX, allow_pickle=False) as archive:
            index = {key: archive[key] for key in ("start", "count", "generator_ids")}
        n = header["num_images"]
        if len(index["start"]) != n or len(index["count"]) != n or len(index["generator_ids"]) != header["num_rows"]:
            raise CheckpointError(f"proposal bank index {path / _INDEX} does not match {header_path}")
        if not allow_partial and header.get("shard") is None and (index["count"] < 0).any():
            raise CheckpointError(f"incomplete proposal bank {path}: cases missing from the index")
        rows_shape = (header["num_rows"], header["row_bytes"])
        if header["num_rows"] == 0:
            rows = np.zeros(rows_shape, dtype=np.uint8)
        else:
            rows = np.memmap(path / _DATA, dtype=np.uint8, mode="r", shape=rows_shape)
        return _Part(path, header, index, rows)

    def verify(self) -> None:
        """Check the CRC-32 of every data file (reads the whole bank once).

        Raises:
            CheckpointError: naming the corrupted file.
        """
        for part in self._parts:
            file = part.path / _DATA
            if _crc32_file(file) != part.header["files"][_DATA]["crc32"]:
                raise CheckpointError(f"proposal bank file {file} fails its CRC-32 check (corrupted)")

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return (f"ProposalBank({str(self.path)!r}, images={len(self)}, spatial_shape={self.spatial_shape}, "
                f"num_classes={self.num_classes}, k_max={self.k_max}, proposals={int(self.num_proposals.sum())})")

    @property
    def valid(self) -> np.ndarray:
        """(N, k_max) bool: slot k of image i holds a proposal (k < K_i)."""
        return np.arange(self.k_max)[None, :] < self.num_proposals[:, None]

    @property
    def num_shards(self) -> int:
        return len(self._parts)

    @property
    def nbytes(self) -> int:
        """Bytes of mask data on disk (all shards)."""
        return sum(int(p.header["files"][_DATA]["size"]) for p in self._parts)

    def _check_index(self, case_index: int) -> int:
        case_index = int(case_index)
        if not 0 <= case_index < len(self):
            raise IndexError(f"case index {case_index} out of range for a bank of {len(self)} images")
        return case_index

    def _rows(self, case_index: int) -> np.ndarray:
        part = self._parts[self._part_of[case_index]]
        start = self._start[case_index]
        return part.rows[start : start + self.num_proposals[case_index]]

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        if self.binary:
            flat = np.unpackbits(np.asarray(rows), axis=-1, count=self.num_pixels)
        else:
            flat = np.array(rows, dtype=np.uint8)
        return flat.reshape(rows.shape[:-1] + self.spatial_shape)

    def packed(self, case_index: int) -> np.ndarray:
        """(K_i, row_bytes) uint8 stored rows of one image (bit-packed for binary banks), in memory."""
        return np.array(self._rows(self._check_index(case_index)))

    def masks(self, case_index: int) -> np.ndarray:
        """(K_i, *spatial) uint8 proposals of one image (binary: 0/1; multi-class: labels)."""
        return self._decode(self._rows(self._check_index(case_index)))

    def generator_ids(self, case_index: int) -> np.ndarray:
        """(K_i,) int16 generator index of each proposal of one image."""
        case_index = self._check_index(case_index)
        part = self._parts[self._part_of[case_index]]
        start = self._start[case_index]
        return np.array(part.generator_ids[start : start + self.num_proposals[case_index]])

    def generator_names(self, case_index: int) -> list[str]:
        """Generator name of each proposal of one image."""
        return [self.generators[g] for g in self.generator_ids(case_index)]

    def iter_chunks(
        self, chunk_size: int = 64, indices: Sequence[int] | np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Stream the bank in chunks of images (only one chunk is decoded at a time).

        Args:
            chunk_size: images per chunk.
            indices: case indices to visit (default: all, in order).

        Yields:
            ``(indices (n,) int64, masks (n, k_max, *spatial) uint8, valid (n, k_max) bool)``; empty
            slots hold zeros.
        """
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        order = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        valid_all = self.valid
        for begin in range(0, len(order), int(chunk_size)):
            chunk = order[begin : begin + int(chunk_size)]
            masks = np.zeros((len(chunk), self.k_max) + self.spatial_shape, dtype=np.uint8)
            for row, case in enumerate(chunk):
                masks[row, : self.num_proposals[case]] = self.masks(case)
            yield chunk, masks, valid_all[chunk]

    def pair_regions(
        self, case_index: np.ndarray, first: np.ndarray, second: np.ndarray, *, block: int = 4096
    ) -> np.ndarray:
        """|D|: number of pixels where proposal ``first`` and ``second`` of the same image differ.

        For bit-packed binary masks the stored bytes are XOR-ed and popcounted (no unpacking).

        Args:
            case_index, first, second: (m,) integer arrays (slots must be < K_i of their image).
            block: pairs processed at a time (bounds memory).

        Returns:
            (m,) int64 pixel counts.
        """
        case_index = np.asarray(case_index, dtype=np.int64)
        first = np.asarray(first, dtype=np.int64)
        second = np.asarray(second, dtype=np.int64)
        if not case_index.shape == first.shape == second.shape or case_index.ndim != 1:
            raise ValueError("case_index, first and second must be 1-D arrays of one length")
        out = np.zeros(len(case_index), dtype=np.int64)
        if not len(case_index):
            return out
        if case_index.min() < 0 or case_index.max() >= len(self):
            raise IndexError(f"case index out of range for a bank of {len(self)} images")
        k = self.num_proposals[case_index]
        if (first < 0).any() or (second < 0).any() or (first >= k).any() or (second >= k).any():
            raise IndexError("proposal slot out of range (slot ≥ K_i of its image)")
        part_of = self._part_of[case_index]
        for number, part in enumerate(self._parts):
            selected = np.flatnonzero(part_of == number)
            for begin in range(0, len(selected), block):
                rows = selected[begin : begin + block]
                base = self._start[case_index[rows]]
                a = part.rows[base + first[rows]]
                b = part.rows[base + second[rows]]
                if self.binary:
                    out[rows] = np.bitwise_count(a ^ b).sum(axis=1, dtype=np.int64)
                else:
                    out[rows] = (a != b).sum(axis=1, dtype=np.int64)
        return out


# ---------------------------------------------------------------------- judge scores
def _scores_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".npy")
    elif path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    return path, path.with_suffix(".json")


def save_scores(path: str | os.PathLike, scores: np.ndarray, meta: dict | None = None) -> Path:
    """Save judge scores (N, K) float (higher = better, NaN in empty slots) as ``.npy`` + ``.json``.

    Both files are written atomically; the JSON sidecar (shape, dtype, CRC-32, ``meta``) is written
    last, so a score file without it is incomplete. Returns the ``.npy`` path.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise RndpoError(f"scores must be a 2-D float array (N, K), got {scores.dtype} {scores.shape}")
    if np.isinf(scores).any():
        raise RndpoError("scores contain ±inf")
    npy_path, json_path = _scores_paths(path)
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(scores))
    sidecar = {"format": "rndpo-judge-scores", "format_version": FORMAT_VERSION,
               "shape": list(scores.shape), "dtype": str(scores.dtype),
               "crc32": _crc32_file(npy_path), "meta": meta or {}}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(sidecar), indent=1, allow_nan=False) + "\n")
    return npy_path


def load_scores(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Load scores saved by :func:`save_scores`: returns ``(scores (N, K), meta)``.

    Raises:
        CheckpointError: a missing/corrupted file or a sidecar that does not match, naming the file.
    """
    npy_path, json_path = _scores_paths(path)
    for file in (npy_path, json_path):
        if not file.is_file():
            raise CheckpointError(f"judge scores file missing: {file}")
    try:
        sidecar = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"unreadable judge scores sidecar {json_path}: {error}") from None
    if _crc32_file(npy_path) != sidecar.get("crc32"):
        raise CheckpointError(f"judge scores file {npy_path} fails its CRC-32 check (truncated or corrupted)")
    try:
        scores = np.load(npy_path, allow_pickle=False)
    except ValueError as error:
        raise CheckpointError(f"unreadable judge scores file {npy_path}: {error}") from None
    if list(scores.shape) != sidecar["shape"]:
        raise CheckpointError(f"judge scores {npy_path} have shape {scores.shape}, sidecar says {sidecar['shape']}")
    return scores, sidecar.get("meta", {})
