"""Streaming safetensors I/O: headers parsed by hand, tensors read in chunks with plain reads.

A soup of N large ingredients must not hold N models. Every recipe reads its ingredients chunk
by chunk (a couple of threads, each reading into its own small reused buffer and doing the
arithmetic on what it just read, so reading and adding overlap) and never memory-maps a file:
mapped pages count toward the process's RSS for as long as they stay mapped, plain reads into
a reused buffer do not.

An *ingredient* is either a safetensors file (a path) or an in-memory state dict; both go
through the same chunked code, so the arithmetic, and hence every bit of the result, is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch

StateDict = Mapping[str, torch.Tensor]
Ingredient = Union[str, os.PathLike, StateDict]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 1 << 20  # small enough to stay in cache between the read and the add
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file (`offset` is absolute, in bytes)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, start + count)`` of the flattened tensor `key`."""

    key: str
    start: int
    count: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor layout and metadata of a safetensors file, from its header alone."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt safetensors header ('__metadata__' is not an object)")
    return {k: _info(path, k, v, 8 + n, size) for k, v in header.items()}, meta


def _ints(value, length: int | None = None) -> bool:
    """Whether a header field is a list of non-negative integers (of `length`, if given)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _info(path, key: str, entry, base: int, size: int) -> TensorInfo:
    """One header entry, checked: an object with a known dtype, a shape of non-negative integers
    and a byte range that fits its shape and the file. A header is JSON written by whoever made
    the file, so each field's type is checked before it is used."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: tensor {key!r} has a corrupt header entry (not an object)")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
    for field, length in (("shape", None), ("data_offsets", 2)):
        if not _ints(entry.get(field), length):
            raise ValueError(f"{path}: tensor {key!r} has a corrupt {field} {entry.get(field)!r}")
    dtype, (start, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
    info = TensorInfo(dtype, tuple(entry["shape"]), base + start, end - start)
    if info.nbytes != info.numel * dtype.itemsize or base + end > size or start < 0:
        raise ValueError(f"{path}: tensor {key!r} has a corrupt byte range {start}..{end}")
    return info


def is_file(ingredient: Ingredient) -> bool:
    """True for a path to a safetensors file, False for an in-memory state dict."""
    return not isinstance(ingredient, Mapping)


def layout(ingredient: Ingredient) -> dict[str, TensorInfo]:
    """Per-tensor dtype and shape (and, for files, byte range), in the file's storage order."""
    if is_file(ingredient):
        infos = read_header(ingredient)[0]
        return dict(sorted(infos.items(), key=lambda kv: kv[1].offset))
    return {k: TensorInfo(v.dtype, tuple(v.shape), -1, v.numel() * v.element_size())
            for k, v in ingredient.items()}


def plan(infos: Mapping[str, TensorInfo], keys: Sequence[str] | None = None,
         chunk_bytes: int | None = None) -> list[Chunk]:
    """Cut tensors `keys` (default: all, in the given order) into chunks of at most `chunk_bytes`
    (default `CHUNK_BYTES`, read at call time)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    out = []
    for k in infos if keys is None else keys:
        info = infos[k]
        step = max(1, chunk_bytes // info.dtype.itemsize)
        out += [Chunk(k, s, min(step, info.numel - s)) for s in range(0, info.numel, step)]
    return out


class _ByteCount:
    """Bytes this process read from weight files through this module (the cook reports them per
    phase): a lock, because several reading threads add to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


_READ = _ByteCount()


def bytes_read() -> int:
    """Bytes read from safetensors files by this module in this process so far."""
    return _READ.total


def _read_exact(fd: int, view: memoryview, offset: int, path) -> None:
    # pread is positional (no shared file offset) and, like readinto, releases the GIL.
    _READ.add(len(view))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: truncated at byte {offset + done}")
        done += got


class Worker:
    """One reading thread's state: open files, a reusable read buffer and float32 scratch space.

    Each worker reads a chunk and does the arithmetic on it itself, so the bytes just read are
    still in that core's cache when they are added (a reader thread handing buffers to another
    core was measured markedly slower).
    """

    def __init__(self, sources: Sequence[Ingredient], layouts: list, fds: dict[int, int], nbytes: int):
        self.sources, self.layouts, self.fds = sources, layouts, fds
        self._buf = torch.empty(nbytes, dtype=torch.uint8)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.local: dict = {}  # per-worker partial results (e.g. dot products), merged by the caller

    def read(self, i: int, c: Chunk) -> torch.Tensor:
        """Chunk `c` of source `i`: valid until this worker's next read; never write into it."""
        if self.layouts[i] is None:  # in memory: a view, nothing to read
            return self.sources[i][c.key].reshape(-1)[c.start:c.start + c.count]
        info = self.layouts[i][c.key]
        nbytes = c.count * info.dtype.itemsize
        _read_exact(self.fds[i], memoryview(self._buf.numpy())[:nbytes],
                    info.offset + c.start * info.dtype.itemsize, self.sources[i])
        return self._buf[:nbytes].view(info.dtype)

    def scratch(self, slot: str, n: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """A reusable `n`-element tensor of this worker, one per `slot` (contents undefined)."""
        key = (slot, str(device), dtype)
        t = self._scratch.get(key)
        if t is None or t.numel() < n:
            t = self._scratch[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return t[:n]

    def as_float(self, view: torch.Tensor, device="cpu", slot: str = "x") -> torch.Tensor:
        """`view` as float32 on `device` (no copy when it already is)."""
        if view.dtype == torch.float32 and view.device == torch.device(device):
            return view
        return self.scratch(slot, view.numel(), device).copy_(view)


def default_workers() -> int:
    """Reading threads: two keep a core busy reading while the other adds (more rarely help)."""
    return max(1, min(2, os.cpu_count() or 1))


def map_chunks(sources: Sequence[Ingredient], chunks: Sequence[Chunk],
               work: Callable[[Chunk, Worker], None], workers: int | None = None) -> list[Worker]:
    """Run ``work(chunk, worker)`` for every chunk, on `workers` threads (in order when one).

    Memory held: one read buffer of the largest chunk per worker, plus the workers' scratch,
    whatever the number of sources. Torch runs single-threaded meanwhile (a process-wide
    setting, restored afterwards; so not meant for concurrent calls from several threads): the
    parallelism is the workers', and an intra-op parallel region per small chunk would stall
    on busy cores. Returns the workers, whose `local` dicts hold any partial results.
    """
    layouts = [layout(s) if is_file(s) else None for s in sources]
    nbytes = max([c.count * lay[c.key].dtype.itemsize for c in chunks for lay in layouts if lay],
                 default=0)
    fds = {i: os.open(s, os.O_RDONLY) for i, s in enumerate(sources) if layouts[i] is not None}
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for c in chunks:
        todo.put(c)
    pool = [Worker(sources, layouts, fds, nbytes) for _ in range(workers or default_workers())]
    errors: list[BaseException] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(pool) == 1:
            _drain(todo, work, pool[0], errors)
        else:
            _run_threads(todo, work, pool, errors)
    finally:
        torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
    if errors:
        raise errors[0]
    return pool


def _drain(todo: queue.SimpleQueue, work, worker: Worker, errors: list) -> None:
    while not errors:
        try:
            c = todo.get_nowait()
        except queue.Empty:
            return
        try:
            work(c, worker)
        except BaseException as err:  # noqa: BLE001 - re-raised by map_chunks
            errors.append(err)


def _run_threads(todo, work, pool: list[Worker], errors: list) -> None:
    ts = [threading.Thread(target=_drain, args=(todo, work, w, errors), daemon=True,
                           name=f"soup-reader-{n}") for n, w in enumerate(pool)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


# --- whole files --------------------------------------------------------------------------------

def read_weights(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors `keys` (default: all) of a safetensors file with plain reads, no mapping."""
    infos = layout(path)
    out = {k: torch.empty(infos[k].shape, dtype=infos[k].dtype) for k in (infos if keys is None else keys)}

    def copy(c: Chunk, w: Worker) -> None:
        out[c.key].view(-1)[c.start:c.start + c.count].copy_(w.read(0, c))

    map_chunks([path], plan(infos, list(out)), copy)
    return out


@dataclass(frozen=True)
class FileScan:
    """One pass over a checkpoint: the sha256 of every byte and the first non-finite tensor."""

    sha256: str
    nonfinite: str | None  # a message naming the tensor, or None when every value is finite


def scan_file(path: str | os.PathLike, chunk_bytes: int | None = None) -> FileScan:
    """Hash the file and look for NaN/Inf in its float tensors, reading each byte once."""
    infos, size = layout(path), os.path.getsize(path)
    state = {"pos": 0, "bad": None}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        def scan(c: Chunk, w: Worker) -> None:
            view = w.read(0, c)
            start = infos[c.key].offset + c.start * view.element_size()
            if start > state["pos"]:  # the header, and any padding between tensors, as it lies
                h.update(_pread(f, state["pos"], start - state["pos"]))
            h.update(memoryview(view.view(torch.uint8).numpy()))
            state["pos"] = start + view.numel() * view.element_size()
            if state["bad"] is None and view.is_floating_point() and not torch.isfinite(view).all():
                state["bad"] = f"tensor {c.key!r} has NaN or Inf values"

        chunks = plan(infos, None, chunk_bytes or 8 * CHUNK_BYTES)
        map_chunks([path], chunks, scan, workers=1)  # one worker: in order, as a hash needs
        h.update(_pread(f, state["pos"], size - state["pos"]))
    return FileScan(h.hexdigest(), state["bad"])


def _pread(f, offset: int, n: int) -> bytes:
    _READ.add(n)
    f.seek(offset)
    return f.read(n)


class FileSink:
    """Writes a safetensors file chunk by chunk, in the order of `infos` (sequential writes)."""

    def __init__(self, path: str | os.PathLike, infos: Mapping[str, TensorInfo],
                 metadata: dict[str, str] | None = None):
        header, pos = {}, 0
        for k, info in infos.items():
            header[k] = {"dtype": CODES[info.dtype], "shape": list(info.shape),
                         "data_offsets": [pos, pos + info.nbytes]}
            pos += info.nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        self.infos, self.path = dict(infos), Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        self._base = 8 + len(raw)
        self._offsets = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}

    def target(self, c: Chunk) -> None:
        """No output slice to accumulate into: chunks are written out as they complete."""
        return None

    def put(self, c: Chunk, data: torch.Tensor) -> None:
        """Write `data` (converted to the tensor's dtype) as chunk `c`; safe from several threads."""
        info = self.infos[c.key]
        raw = memoryview(data.detach().to("cpu", info.dtype).contiguous().view(torch.uint8).numpy())
        offset, done = self._base + self._offsets[c.key] + c.start * info.dtype.itemsize, 0
        while done < len(raw):
            done += os.pwrite(self._fd, raw[done:], offset + done)

    def close(self) -> Path:
        """Finish the file and return its path."""
        os.close(self._fd)
        return self.path


class MemorySink:
    """Collects chunks into tensors of each key's dtype (float ones in `dtype` if given)."""

    def __init__(self, infos: Mapping[str, TensorInfo], dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", into: dict[str, torch.Tensor] | None = None):
        self.infos = dict(infos)
        self.out = into if into is not None else {
            k: torch.empty(i.shape, dtype=dtype if dtype and i.dtype.is_floating_point else i.dtype,
                           device=device) for k, i in infos.items()}

    def target(self, c: Chunk) -> torch.Tensor | None:
        """The output slice of chunk `c` when it is float32 (then accumulate into it directly)."""
        t = self.out[c.key]
        return t.view(-1)[c.start:c.start + c.count] if t.dtype == torch.float32 else None

    def put(self, c: Chunk, data: torch.Tensor) -> None:
        """Copy `data` into chunk `c` (converting dtype and device as needed)."""
        target = self.out[c.key].view(-1)[c.start:c.start + c.count]
        if target.data_ptr() != data.data_ptr():
            target.copy_(data)

    def close(self) -> dict[str, torch.Tensor]:
        """The collected state dict."""
        return self.out


Sink = Union[FileSink, MemorySink]
