"""sha256 of weight files for lineage records: of inputs, read once; of outputs, computed while they are written.

:class:`FileHasher` hashes files (streamed, one buffer for the whole file). One hasher serves one command: when
two threads ask for the same file (the merge starts hashing its inputs in the background while torch loads, and
the lineage record asks for the same digests later) the second waits for the first instead of reading the file
again. Digests of large files are also kept in a :class:`DigestCache` file, keyed by path, size and modification
time, so a model is hashed once and not on every merge (``benchmarks/merge_bench.py`` measures what that saves:
the "hashing inputs" and "hashes cached" columns). A file in the Hugging Face cache whose blob is named by its
sha256 (every LFS file) is never read.

:class:`BackgroundDigests` feeds the bytes a writer puts into each output shard, in file order, to that shard's
hasher from a thread of its own, so the output need not be read back to be hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

HASH_CHUNK_BYTES = 16 * 1024 * 1024
PENDING_HASH_BYTES = 64 * 2**20  # written bytes waiting to be hashed, at most (one larger buffer waits alone)


def sha256_of_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """The sha256 hex digest of a file, streamed through one buffer (no fresh pages per chunk)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk_bytes))
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
    return digest.hexdigest()


def _hub_blob_digest(real: Path) -> str | None:
    """A Hugging Face cache blob is named by its sha256: the digest without reading the file."""
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    return None


class DigestCache:
    """Digests of files of at least ``min_bytes``, in one JSON file, keyed by ``"<real path>:<size>:<mtime_ns>"``.

    Reads and writes are serialized; a cache file that cannot be read counts as empty, one that cannot be written
    is left as it was (the digests are then only kept by the hasher that computed them).
    """

    MIN_BYTES = 64 * 1024 * 1024

    def __init__(self, path: Path, *, min_bytes: int = MIN_BYTES) -> None:
        self.path = path
        self.min_bytes = min_bytes
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> "DigestCache":
        """``$MTOOL_CACHE_DIR/sha256.json`` (default ``~/.cache/mtool``)."""
        folder = Path(os.environ.get("MTOOL_CACHE_DIR", Path.home() / ".cache" / "mtool"))
        return cls(folder / "sha256.json")

    def _entries(self) -> dict[str, str]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            entries = {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._entries().get(key)

    def put(self, key: str, digest: str) -> None:
        with self._lock:
            entries = self._entries()
            entries[key] = digest
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps(entries), encoding="utf-8")
                os.replace(temporary, self.path)


class FileHasher:
    """sha256 of files, each computed once per hasher (see the module docstring).

    ``cache`` remembers large files' digests across processes (None: no cache file); ``compute`` is the function
    that reads a file (tests pass a slower or failing one).
    """

    def __init__(self, cache: DigestCache | None = None, *,
                 compute: Callable[[Path], str] = sha256_of_file) -> None:
        self.cache = cache
        self._compute = compute
        self._lock = threading.Lock()
        self._running: dict[str, Future[str]] = {}  # digests being computed now, by cache key
        self._done: dict[str, str] = {}  # digests computed by this hasher, by cache key

    @classmethod
    def default(cls) -> "FileHasher":
        """A hasher with the user's digest cache (:meth:`DigestCache.default`)."""
        return cls(DigestCache.default())

    def sha256(self, path: str | os.PathLike) -> str:
        """The sha256 hex digest of ``path`` (see the module docstring); OSError when it cannot be read."""
        real = Path(path).resolve()
        named = _hub_blob_digest(real)
        if named is not None:
            return named
        stat = real.stat()
        key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
        with self._lock:
            if key in self._done:
                return self._done[key]
            running = self._running.get(key)
            owner = running is None
            if owner:
                running = self._running[key] = Future()
        if not owner:
            return running.result()
        try:
            digest = self._cached_or_computed(real, key, stat.st_size)
        except BaseException as error:
            with self._lock:
                del self._running[key]
            running.set_exception(error)
            raise
        with self._lock:
            del self._running[key]
            self._done[key] = digest
        running.set_result(digest)
        return digest

    def _cached_or_computed(self, real: Path, key: str, size: int) -> str:
        cached = self.cache is not None and size >= self.cache.min_bytes
        if cached:
            found = self.cache.get(key)
            if found is not None:
                return found
        digest = self._compute(real)
        if cached:
            self.cache.put(key, digest)
        return digest

    def hash_files(self, files: Iterable[str | os.PathLike]) -> dict[str, str]:
        """``{file name: sha256}`` for each file."""
        return {Path(f).name: self.sha256(f) for f in files}

    def start(self, files: Sequence[str | os.PathLike]) -> threading.Thread:
        """Start hashing ``files`` in a daemon thread, so that a later :meth:`sha256` of each finds its digest
        computed or in progress (e.g. while the rest of the program starts up). Errors are left for that later
        call to raise."""

        def run() -> None:
            for file in files:
                with contextlib.suppress(Exception):  # the later call raises it where it can be reported
                    self.sha256(file)

        thread = threading.Thread(target=run, name="mtool-prehash", daemon=True)
        thread.start()
        return thread


class BackgroundDigests:
    """Feeds each shard's hasher, in file order, from a thread of its own: hashing the output overlaps
    writing it (hashlib releases the GIL on large buffers). Fed buffers must not change afterwards; at most
    ``pending_bytes`` wait (a larger buffer waits alone, so one large tensor may outlive its write).

    A shard whose hashing failed, or that is fed after :meth:`finish`, loses its hasher (set to None): it gets
    no digest from the writer and is hashed from disk instead. Nothing here blocks after :meth:`finish`.
    """

    def __init__(self, hashers: list["hashlib._Hash | None"], *, pending_bytes: int = PENDING_HASH_BYTES) -> None:
        self.hashers = hashers
        self.pending_limit = pending_bytes
        self._pending: deque[tuple[int, memoryview]] = deque()
        self._pending_bytes = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def feed(self, shard: int, data: memoryview) -> None:
        with self._changed:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="mtool-hash", daemon=True)
                self._thread.start()
            self._changed.wait_for(lambda: self._stopping or not self._pending
                                   or self._pending_bytes + len(data) <= self.pending_limit)
            if self._stopping:
                self.hashers[shard] = None
                return
            self._pending.append((shard, data))
            self._pending_bytes += len(data)
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending) or self._stopping)
                if not self._pending:
                    return
                shard, data = self._pending[0]
            hasher = self.hashers[shard]
            if hasher is not None:
                try:
                    hasher.update(data)
                except BaseException:  # noqa: BLE001 - that shard is hashed from disk instead
                    self.hashers[shard] = None
            with self._changed:
                self._pending.popleft()
                self._pending_bytes -= len(data)
                self._changed.notify_all()

    def finish(self) -> None:
        """Wait until everything fed is hashed and stop the thread (a later feed only drops its shard's hash)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None
