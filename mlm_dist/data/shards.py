"""The shard format, in one place: what `prepare` writes and what the loader reads.

A shard is a plain (uncompressed) WebDataset tar. One sample is one document:

    {"__key__": "000000042",          # the document's index in the corpus, 9 digits
     "tokens.npy": <npy bytes>,       # 1-D: every token id of the document, sentences concatenated
     "lengths.npy": <npy bytes>,      # 1-D int32: tokens per sentence, in order
     "starts.npy": <npy bytes>}       # 1-D uint8, one per token: 1 where the token begins a word

Token ids are uint16 when the vocabulary fits (half the disk and page cache of int32), else int32.
No [CLS]/[SEP] are stored: the loader builds NSP pairs at the current sequence length, so the
shards stay valid for every phase of the length schedule.

Word starts are decided once, at `prepare` time, where the text is at hand: by a real word
segmenter for Japanese (MeCab) and Chinese (jieba), whose words a tokenizer cannot see in text
without spaces, and by the tokenizer's own marks otherwise ("▁" / "##"). Whole-word masking
reads them from the batch. Format 2 added them; format 1 shards must be prepared again.

Decoded, a sentence is one int64 array carrying both: the id in the low bits and WORD_START
set where the token begins a word (`token_ids`, `word_starts` take them apart). One array per
sentence keeps NSP pairing, truncation and batching as simple as ids alone would be.

Next to the shards, manifest.json records the tokenizer they were made with and, per shard,
its counts and sha256, so a run can check everything before spending any time on it. A
partitioned `prepare` (one Slurm array task per partition) writes one partial manifest per
partition, `manifest.p00003-of-00008.json`, which `mlm-dist prepare --merge` joins into
manifest.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from mlm_dist.errors import PathExistsError, PathNotFoundError, UserError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
WORD_START = 1 << 40  # the flag bit in a decoded token (ids stay below 2**31)
TOKEN_DTYPES = ("uint16", "int32")
_PREPARE_HINT = "run `mlm-dist prepare --input … --tokenizer … --out DIR` to create shards"

# np.save writes version 1.0 headers of exactly this shape for the 1-D little-endian integer
# arrays we store. Matching it directly is much cheaper than np.load, which evaluates the header
# as a Python literal; anything else (another writer's formatting) falls back to np.load.
_NPY_MAGIC_V1 = b"\x93NUMPY\x01\x00"
_NPY_1D_HEADER = re.compile(rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, "
                            rb"'shape': \((\d+),\), \}")


# ----------------------------------------------------------------------------- samples

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def document_key(index: int, partition: int | None = None) -> str:
    """`000000042`, or `p00003-000000042` for partition 3: keys stay unique across partitions."""
    return f"{index:09d}" if partition is None else f"p{partition:05d}-{index:09d}"


def encode_document(sentences_ids: list[list[int]], sentences_starts: list, dtype) -> dict:
    """The .npy fields of one document's sample (the caller adds "__key__");
    `sentences_starts[i][j]` is true where token j of sentence i begins a word."""
    lengths = np.array([len(s) for s in sentences_ids], dtype=np.int32)
    tokens = np.array([i for s in sentences_ids for i in s], dtype=dtype)
    starts = np.array([bool(f) for s in sentences_starts for f in s], dtype=np.uint8)
    if starts.size != tokens.size:
        raise ValueError(f"{starts.size} word-start flags for {tokens.size} tokens")
    return {"tokens.npy": npy_bytes(tokens), "lengths.npy": npy_bytes(lengths),
            "starts.npy": npy_bytes(starts)}


def token_ids(sentence: np.ndarray) -> np.ndarray:
    """The ids of a decoded sentence (or pair segment), without the word-start flags."""
    return sentence & (WORD_START - 1)


def word_starts(sentence: np.ndarray) -> np.ndarray:
    """Bool per token of a decoded sentence: where a word begins."""
    return sentence >= WORD_START


def encode_sample(key: str, fields: dict[str, bytes]) -> bytes:
    """One sample as the tar members a WebDataset reader groups back into it: `key.field`.

    Written by hand rather than with tarfile (via wds.TarWriter), which spends ~70 µs per member
    building a header and was most of `prepare`'s time. The bytes are exactly what
    wds.TarWriter(encoder=False, mtime=0) writes: plain ustar, mode 0444, owner bigdata.
    """
    return b"".join(_tar_member(f"{key}.{field}", fields[field]) for field in sorted(fields))


def tar_end(size: int) -> bytes:
    """What closes a tar of `size` bytes: two zero blocks, then zeros to a whole 10 KiB record."""
    return bytes(2 * _TAR_BLOCK + (-(size + 2 * _TAR_BLOCK) % _TAR_RECORD))


_TAR_BLOCK, _TAR_RECORD = 512, 20 * 512


def _tar_header_template() -> bytes:
    """A ustar header with every field but name, size and checksum filled in."""
    header = bytearray(_TAR_BLOCK)
    header[100:124] = b"0000444\x000000000\x000000000\x00"  # mode, uid, gid
    header[136:148] = b"00000000000\x00"  # mtime 0: the same input gives the same bytes
    header[148:156] = b"        "  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"  # a regular file
    header[257:265] = b"ustar\x0000"
    header[265:272] = header[297:304] = b"bigdata"  # owner and group names
    return bytes(header)


_TAR_HEADER = _tar_header_template()
_TAR_HEADER_SUM = sum(_TAR_HEADER)


def _tar_member(name: str, data: bytes) -> bytes:
    encoded_name = name.encode("utf-8")
    if len(encoded_name) > 100 or not encoded_name.isascii():
        raise ValueError(f"tar member name {name!r} is not a short ASCII name")
    size = b"%011o\x00" % len(data)
    checksum = _TAR_HEADER_SUM + sum(encoded_name) + sum(size)
    return b"".join((encoded_name.ljust(100, b"\0"), _TAR_HEADER[100:124], size,
                     _TAR_HEADER[136:148], b"%06o\x00 " % checksum, _TAR_HEADER[156:],
                     data, bytes(-len(data) % _TAR_BLOCK)))


def decode_document(sample: dict) -> list[np.ndarray]:
    """A document's sentences as int64 arrays of ids with their WORD_START flags, checked."""
    where = _sample_name(sample)
    for field in ("tokens.npy", "lengths.npy", "starts.npy"):
        if field not in sample:
            raise ShardFormatError(f"{where} has no {field!r}; is this a shard written by `mlm-dist prepare`?")
    tokens = _array_of(sample["tokens.npy"], where, "tokens.npy")
    lengths = _array_of(sample["lengths.npy"], where, "lengths.npy")
    starts = _array_of(sample["starts.npy"], where, "starts.npy")
    if lengths.size and lengths.min() <= 0:
        raise ShardFormatError(f"{where}: lengths.npy has a sentence of {lengths.min()} tokens; "
                               "the shard is corrupt, re-create it with `mlm-dist prepare`")
    total = int(lengths.sum(dtype=np.int64))
    if total != tokens.size:
        raise ShardFormatError(f"{where}: sentence lengths add up to {total} but there are "
                               f"{tokens.size} tokens; the shard is corrupt, re-create it with `mlm-dist prepare`")
    if starts.size != tokens.size:
        raise ShardFormatError(f"{where}: starts.npy has {starts.size} flags for {tokens.size} tokens; "
                               "the shard is corrupt, re-create it with `mlm-dist prepare`")
    if lengths.size == 0:
        return []
    packed = tokens.astype(np.int64) | (starts.astype(np.int64) * WORD_START)
    return np.split(packed, np.cumsum(lengths[:-1]))


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes np.save writes for `array`.

    1-D little-endian integer arrays (all we store) get np.save's exact header written here,
    much cheaper than np.save itself, which was most of `prepare`'s time per document.
    """
    if array.ndim == 1 and array.dtype.kind in "iu" and array.dtype.str[0] in "<|":
        header = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (
            array.dtype.str, array.size)
        # np.save pads with spaces and a newline so the data starts at a multiple of 64 bytes.
        header += " " * (-(len(_NPY_MAGIC_V1) + 2 + len(header) + 1) % 64) + "\n"
        return (_NPY_MAGIC_V1 + len(header).to_bytes(2, "little") + header.encode("latin1")
                + array.tobytes())
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _array_of(value, where: str, field: str) -> np.ndarray:
    """A 1-D integer array from a field's raw npy bytes (or an array a decoder already made)."""
    try:
        array = value if isinstance(value, np.ndarray) else _npy_from_bytes(value)
    except (ValueError, TypeError, EOFError) as e:
        raise ShardFormatError(f"{where}: {field} is not a readable .npy array ({e}); the shard is "
                               "corrupt, re-create it with `mlm-dist prepare`") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ShardFormatError(f"{where}: {field} is a {array.ndim}-D {array.dtype} array, expected 1-D "
                               "integers; is this a shard written by `mlm-dist prepare`?")
    return array


def _npy_from_bytes(data: bytes) -> np.ndarray:
    data = bytes(data)
    if data[:8] == _NPY_MAGIC_V1:
        header_end = 10 + int.from_bytes(data[8:10], "little")
        header = _NPY_1D_HEADER.match(data, 10, header_end)
        if header:
            return np.frombuffer(data, dtype=header.group(1).decode(),
                                 count=int(header.group(2)), offset=header_end)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _sample_name(sample: dict) -> str:
    name = f"sample {sample.get('__key__', '<no key>')!r}"
    return f"{name} of {sample['__url__']}" if "__url__" in sample else name


# ----------------------------------------------------------------------------- manifest

class ShardFormatError(UserError, ValueError):
    """Shards or a manifest this mlm_dist cannot read: another format, a corrupt or incomplete
    shard, a split that is not there; the message says how to make them again."""


@dataclass
class TokenizerInfo:
    sha256: str
    vocab_size: int
    path: str  # absolute directory of the tokenizer the shards were made with


@dataclass
class ShardInfo:
    path: str  # relative to the shard directory
    documents: int
    sentences: int
    tokens: int
    sha256: str
    bytes: int  # lets shard_paths catch a truncated copy without hashing gigabytes


@dataclass
class PrepareInfo:
    """How `prepare` made the shards: what merging partitions must check, and input problems."""
    files: int  # input files read (for a partial manifest: this partition's files)
    inputs_sha256: str  # of the whole expanded input list; every partition must agree on it
    seed: int
    valid_fraction: float
    invalid_utf8: int  # invalid UTF-8 sequences replaced by U+FFFD, over all files read
    invalid_utf8_files: int  # how many of the files had any
    num_partitions: int = 1  # of the run; a merged manifest keeps the count it was merged from
    partition: int | None = None  # set only in a partial manifest: the partition it covers
    lang: str = "en"  # `prepare --lang`: sentence splitting and word segmentation
    shuffle_mb: int | None = None  # `prepare --shuffle-mb` (None: made before it existed)
    text_field: str = "text"  # `prepare --text-field`: where JSON lines and Parquet keep text
    missing_text: int = 0  # records (JSON lines, Parquet rows) without that field, skipped
    missing_text_files: int = 0  # how many of the files had any


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str
    splits: dict[str, list[ShardInfo]]
    format: int = FORMAT_VERSION
    prepare: PrepareInfo | None = None  # absent from manifests written before it existed

    def totals(self, split: str) -> dict[str, int]:
        shards = self.splits.get(split, [])
        return {"shards": len(shards),
                **{k: sum(getattr(s, k) for s in shards) for k in ("documents", "sentences", "tokens")}}

    def save(self, directory: str | Path, filename: str = MANIFEST_FILE) -> Path:
        """Write `directory/filename` (manifest.json unless a partial one); never replaces one."""
        target = Path(directory) / filename
        if target.exists():
            raise PathExistsError(f"{target} already exists; write the shards to a new directory")
        data = {"format": self.format, "tokenizer": asdict(self.tokenizer), "dtype": self.dtype,
                "splits": {name: [asdict(s) for s in shards] for name, shards in self.splits.items()}}
        if self.prepare is not None:
            data["prepare"] = asdict(self.prepare)
        # Written under a temporary name first: a reader never sees half a manifest, and a
        # manifest only appears once every shard it lists is complete. The name is unique so
        # that two writers (partitions, or merges racing on a shared filesystem) never share it.
        tmp = target.with_name(f"{filename}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _publish(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    @classmethod
    def load(cls, directory: str | Path, streams=None) -> "Manifest":
        """The manifest of a shard directory, or of a URL where one is served (remote.py,
        read with `streams`, a remote.StreamSettings: the run's timeout)."""
        from mlm_dist.data import remote

        if remote.is_remote(str(directory)):
            remote.check_location(str(directory))
            where = remote.redacted(remote.join(str(directory), MANIFEST_FILE))
            text = remote.read_file(str(directory), MANIFEST_FILE,
                                    streams or remote.StreamSettings())
            return cls.parse(text, where)
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise PathNotFoundError(f"shard directory {directory} does not exist; {_PREPARE_HINT}")
        if not path.is_file() and any(directory.glob("manifest.p*-of-*.json")):
            raise PathNotFoundError(f"{directory} holds the partial manifests of a partitioned "
                                    f"`prepare` but no {MANIFEST_FILE}: once every partition is "
                                    f"done, run `mlm-dist prepare --merge {directory}`")
        if not path.is_file():
            raise PathNotFoundError(f"{directory} has no {MANIFEST_FILE}, so it is not a finished "
                                    f"shard directory; {_PREPARE_HINT}")
        return cls.read(path)

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Parse and check one manifest file (manifest.json or a partition's partial manifest)."""
        path = Path(path)
        return cls.parse(path.read_bytes(), str(path))

    @classmethod
    def parse(cls, text: bytes, where: str) -> "Manifest":
        """A manifest from its bytes; `where` (its path or URL) names it in errors."""
        try:
            data = json.loads(text.decode("utf-8"))
            return _manifest_from_json(data)
        except ShardFormatError as e:
            raise ShardFormatError(f"{where}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            problem = (f"missing key {e}" if isinstance(e, KeyError) else
                       f"not JSON: {e}" if isinstance(e, json.JSONDecodeError) else str(e))
            raise ShardFormatError(f"{where} is malformed ({problem}); {_PREPARE_HINT}") from None


def _publish(tmp: Path, target: Path):
    """Give `tmp` the name `target`, failing if `target` exists, even if it appeared just now."""
    try:
        # A hard link is atomic and refuses an existing name, where a rename would replace it.
        os.link(tmp, target)
    except FileExistsError:
        raise PathExistsError(f"{target} already exists; write the shards to a new directory") from None
    except OSError:
        # Filesystems without hard links: check, then rename (a race window of microseconds).
        if target.exists():
            raise PathExistsError(f"{target} already exists; write the shards to a new "
                                  "directory") from None
        tmp.replace(target)


def _manifest_from_json(data) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if data["format"] != FORMAT_VERSION:
        raise ShardFormatError(
            f"shard format {data['format']!r}, and this mlm_dist reads format {FORMAT_VERSION}"
            + (" (format 2 stores word boundaries for whole-word masking)"
               if data["format"] == 1 else "")
            + "; re-run `mlm-dist prepare` on the corpus to write the shards again"
            + (", or use the mlm_dist version that wrote them" if isinstance(data["format"], int)
               and data["format"] > FORMAT_VERSION else ""))
    tok = _typed(data["tokenizer"], dict, "tokenizer")
    tokenizer = TokenizerInfo(sha256=_typed(tok["sha256"], str, "tokenizer.sha256"),
                              vocab_size=_typed(tok["vocab_size"], int, "tokenizer.vocab_size"),
                              path=_typed(tok["path"], str, "tokenizer.path"))
    dtype = data["dtype"]
    if dtype not in TOKEN_DTYPES or np.iinfo(dtype).max < tokenizer.vocab_size - 1:
        raise ValueError(f"dtype {dtype!r} cannot hold a vocabulary of {tokenizer.vocab_size}")
    splits = {}
    for name, shards in _typed(data["splits"], dict, "splits").items():
        splits[name] = [_shard_from_json(s, f"splits.{name}[{i}]")
                        for i, s in enumerate(_typed(shards, list, f"splits.{name}"))]
    prepare = _prepare_from_json(data["prepare"]) if data.get("prepare") is not None else None
    return Manifest(tokenizer=tokenizer, dtype=dtype, splits=splits, prepare=prepare)


def _prepare_from_json(entry) -> PrepareInfo:
    _typed(entry, dict, "prepare")
    fraction = entry["valid_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"prepare.valid_fraction should be a number, got {fraction!r}")
    partition, shuffle_mb = entry.get("partition"), entry.get("shuffle_mb")
    return PrepareInfo(
        **{k: _typed(entry[k], int, f"prepare.{k}")
           for k in ("files", "seed", "invalid_utf8", "invalid_utf8_files", "num_partitions")},
        # absent from manifests written before `prepare --text-field` existed
        **{k: _typed(entry.get(k, 0), int, f"prepare.{k}")
           for k in ("missing_text", "missing_text_files")},
        text_field=_typed(entry.get("text_field", "text"), str, "prepare.text_field"),
        inputs_sha256=_typed(entry["inputs_sha256"], str, "prepare.inputs_sha256"),
        valid_fraction=float(fraction),
        partition=None if partition is None else _typed(partition, int, "prepare.partition"),
        lang=_typed(entry.get("lang", "en"), str, "prepare.lang"),
        shuffle_mb=None if shuffle_mb is None else _typed(shuffle_mb, int, "prepare.shuffle_mb"))


def _shard_from_json(entry, where: str) -> ShardInfo:
    _typed(entry, dict, where)
    shard = ShardInfo(path=_typed(entry["path"], str, f"{where}.path"),
                      **{k: _typed(entry[k], int, f"{where}.{k}")
                         for k in ("documents", "sentences", "tokens", "bytes")},
                      sha256=_typed(entry["sha256"], str, f"{where}.sha256"))
    if not is_inside_path(shard.path):
        # Paths in a manifest are data: one must never point a reader outside the directory.
        raise ValueError(f"{where}.path {shard.path!r} is not a relative path inside the shard "
                         "directory")
    return shard


def _typed(value, kind: type, where: str):
    # bool is an int in Python, but `"documents": true` is still a broken manifest.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where} should be {kind.__name__}, got {value!r}")
    return value


def is_inside_path(path: str) -> bool:
    """True for a relative path that stays inside its directory on POSIX and on Windows."""
    if not path or path.startswith(("/", "\\")) or PureWindowsPath(path).drive:
        return False
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return ".." not in parts and parts not in ((), (".",))


# ----------------------------------------------------------------------------- shard files

def shard_paths(directory: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, each checked to exist with the size the manifest says."""
    root = Path(directory).resolve()
    manifest = Manifest.load(root)
    if split not in manifest.splits:
        raise ShardFormatError(f"{root / MANIFEST_FILE} has no split {split!r}; it has "
                               f"{', '.join(sorted(manifest.splits)) or 'none'}")
    paths = []
    for shard in manifest.splits[split]:
        path = root / shard.path
        if not path.is_file():
            raise PathNotFoundError(f"shard {path} listed in {root / MANIFEST_FILE} is missing; "
                                    "copy the whole shard directory, or re-run `mlm-dist prepare`")
        size = path.stat().st_size
        if size != shard.bytes:
            raise ShardFormatError(f"shard {path} is {size} bytes but {root / MANIFEST_FILE} says "
                                   f"{shard.bytes}: it is truncated or was replaced; copy it again, or "
                                   "re-run `mlm-dist prepare`")
        paths.append(str(path))
    return paths


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
