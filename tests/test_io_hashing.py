"""sha256 of input files (one hasher per command, the digest cache) and of outputs while they are written."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from mtool.io.hashing import BackgroundDigests, DigestCache, FileHasher, sha256_of_file
from mtool.io.writing import CheckpointWriter, TensorSpec


def test_files_are_hashed_streamed_and_hub_blobs_by_their_name(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    payload = bytes(range(256)) * 1000
    path.write_bytes(payload)
    assert sha256_of_file(path, chunk_bytes=1000) == hashlib.sha256(payload).hexdigest()
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(b"x").hexdigest()
    (blobs / digest).write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(blobs / digest)
    unread = FileHasher(compute=lambda path: pytest.fail(f"{path} was read"))
    assert unread.sha256(tmp_path / "link.safetensors") == digest


def test_large_file_digests_are_remembered_by_path_size_and_mtime(tmp_path: Path) -> None:
    cache = DigestCache(tmp_path / "cache" / "sha256.json", min_bytes=10)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"0123456789" * 100)
    true_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert FileHasher(cache).sha256(path) == true_digest
    entries = json.loads(cache.path.read_text())
    assert list(entries.values()) == [true_digest]
    cache.path.write_text(json.dumps({key: "remembered" for key in entries}))
    assert FileHasher(cache).sha256(path) == "remembered"  # a new hasher (a new command) reads the cache
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert FileHasher(cache).sha256(path) == true_digest  # a touched file is hashed again
    small = tmp_path / "small.json"
    small.write_bytes(b"123")
    FileHasher(cache).sha256(small)
    assert len(json.loads(cache.path.read_text())) == 2  # files below min_bytes are not cached


def test_the_default_cache_lives_in_mtool_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MTOOL_CACHE_DIR", str(tmp_path / "here"))
    assert FileHasher.default().cache.path == tmp_path / "here" / "sha256.json"


def test_a_file_hashed_by_two_threads_at_once_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(bytes(range(256)) * 4096)
    computing, release = threading.Event(), threading.Event()
    computed = []

    def gated(file: Path) -> str:
        computed.append(file)
        computing.set()
        release.wait(10)
        return sha256_of_file(file)

    hasher = FileHasher(None, compute=gated)
    background = hasher.start([path])
    assert computing.wait(10)
    results = []
    second = threading.Thread(target=lambda: results.append(hasher.sha256(path)))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for the first caller's result, not reading the file itself
    release.set()
    second.join(10)
    background.join(10)
    assert results == [hashlib.sha256(path.read_bytes()).hexdigest()]
    assert computed == [path.resolve()]
    assert hasher.sha256(path) == results[0] and len(computed) == 1  # and remembered by this hasher


def test_background_hashing_leaves_errors_to_the_later_call(tmp_path: Path, monkeypatch) -> None:
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    missing = tmp_path / "gone.safetensors"
    hasher = FileHasher(None)
    hasher.start([missing]).join(10)
    assert uncaught == []  # nothing escaped the background thread
    with pytest.raises(FileNotFoundError):
        hasher.sha256(missing)


def test_digests_are_kept_by_the_hasher_when_the_cache_cannot_be_written(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    computed = []
    hasher = FileHasher(DigestCache(blocked / "sha256.json", min_bytes=10),
                        compute=lambda file: computed.append(1) or sha256_of_file(file))
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 100)
    hasher.start([path]).join(10)
    assert hasher.sha256(path) == hashlib.sha256(b"x" * 100).hexdigest()
    assert computed == [1]  # the background result served the later call


class _BlockingHasher:
    """A hashlib stand-in that waits for ``release`` inside update (or raises, with ``fail``)."""

    def __init__(self, fail: bool = False) -> None:
        self.release, self.fail, self.updates = threading.Event(), fail, 0

    def update(self, data) -> None:
        self.release.wait(10)
        self.updates += 1
        if self.fail:
            raise MemoryError("stand-in for a failing hash")


def test_background_digests_never_block_after_finish() -> None:
    hasher = _BlockingHasher()
    hashing = BackgroundDigests([hasher], pending_bytes=8)
    hashing.feed(0, memoryview(b"abcdef"))  # taken by the hash thread, which blocks in update
    waiting = threading.Thread(target=hashing.feed, args=(0, memoryview(b"ghijkl")))  # over the budget: waits
    waiting.start()
    finishing = threading.Thread(target=hashing.finish)
    finishing.start()
    hasher.release.set()
    waiting.join(10)
    finishing.join(10)
    assert not waiting.is_alive() and not finishing.is_alive()
    assert hashing.hashers[0] is None  # the shard missed bytes: no digest from the writer, hashed from disk
    hashing.feed(0, memoryview(b"late"))  # after finish: dropped at once
    assert hasher.updates == 1


def test_a_failing_hash_drops_that_shard_digest_and_the_file_is_hashed_from_disk(tmp_path: Path) -> None:
    failing = _BlockingHasher(fail=True)
    failing.release.set()
    hashing = BackgroundDigests([failing])
    for _ in range(3):
        hashing.feed(0, memoryview(b"x" * 10))
    hashing.finish()
    assert hashing.hashers[0] is None and failing.updates == 1
    specs = [TensorSpec("t", (4,), torch.float32)]
    with CheckpointWriter(tmp_path, specs, in_order=True) as writer:
        writer._hashers[0] = failing
        writer.write("t", torch.arange(4, dtype=torch.float32))
    assert writer.digests == {}  # finish_output then hashes model.safetensors from disk


def test_output_digests_computed_while_writing_equal_the_files(tmp_path: Path) -> None:
    specs = [TensorSpec(f"t{i}", (1000,), torch.float32) for i in range(6)]
    with CheckpointWriter(tmp_path, specs, in_order=True, max_shard_bytes=8000) as writer:
        for index, spec in enumerate(specs):
            writer.write(spec.name, torch.full((1000,), float(index)))
    assert len(writer.files) == 3
    assert writer.digests == {file.name: sha256_of_file(file) for file in writer.files}
