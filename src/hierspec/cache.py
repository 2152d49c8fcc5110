"""Self-healing cache entries: a cached file or folder is used only if it matches its manifest;
otherwise it is rebuilt from its source, once, under a lock.

Invariant: an entry is *valid* iff its manifest exists, is ours (format + version), and every
file it lists has the recorded size and sample checksum. The manifest is written LAST and
atomically (`write_json_atomic`), after the entry's content is complete and in place, so a crash
at any point leaves an entry that is either valid or detected as damaged, never one that is
trusted but incomplete. An entry without a manifest (e.g. made by an older hierspec) is damaged.

Layout: a folder entry ``<root>/<name>/`` holds its manifest as ``<name>/.hierspec-manifest.json``
(built in a ``.tmp-<name>-*`` sibling, then renamed into place); a file entry ``<root>/<name>``
has the sibling ``<root>/<name>.manifest.json``. Rebuilds take ``fcntl.flock`` on
``<root>/.<name>.lock`` and re-check the entry first, so concurrent first uses build it once.
Reading a valid entry takes no lock (a read-only cache works as long as it is valid).

Checks: the manifest records, per file, the size, the full sha256 and ``sample_sha256`` = sha256
of the first, middle and last MiB (the whole file if it is at most 3 MiB). Every use checks sizes
and the sample (~10 ms); the full sha256 is computed when writing and checked only on demand
(``verify(path, full=True)``): a full sha256 of the 540 MB float32 SmolLM2 copy takes ~0.65 s
here, too much for every load. Truncation, deletion and replaced small files (configs, JSON) are
always caught; a flipped byte in the middle of a large file is caught by the full check, or by
the loader failing (`load_verified` then rebuilds once).

Messages: a rebuild of a damaged entry logs ONE line (logger ``hierspec.cache``, level WARNING,
printed as one stderr line when logging is not configured) naming the path; an entry that cannot
be built or rebuilt (read-only cache, disk full) raises `CacheError` naming the path to delete.

    verified_file(path, build, expected_sha256=None) -> path   # build(tmp: Path) writes the file
    verified_dir(path, build) -> path                          # build(tmp: Path) fills the folder
    load_verified(path, build, load, directory=True) -> T      # also rebuilds if load(path) raises
    read_json_cache(path, validate) -> obj | None              # small JSON caches: no manifest
    write_json_cache(path, obj) -> bool
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .files import write_atomic, write_json_atomic

__all__ = [
    "CacheError",
    "cache_root",
    "load_verified",
    "read_json_cache",
    "verified_dir",
    "verified_file",
    "verify",
    "write_json_cache",
    "write_manifest",
]

log = logging.getLogger("hierspec.cache")
T = TypeVar("T")
MANIFEST_FORMAT = "hierspec-cache-manifest"
MANIFEST_VERSION = 1
DIR_MANIFEST = ".hierspec-manifest.json"
_MIB = 1 << 20
_WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
}
_HINT = "set HIERSPEC_CACHE to a writable folder"


class CacheError(OSError):
    """A cache entry is missing or damaged and cannot be (re)built here; the message names it."""


def cache_root() -> Path:
    """User cache root: $HIERSPEC_CACHE, else $XDG_CACHE_HOME/hierspec, else ~/.cache/hierspec."""
    if os.environ.get("HIERSPEC_CACHE"):
        return Path(os.environ["HIERSPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hierspec"
    return Path.home() / ".cache" / "hierspec"


def manifest_path(path: str | os.PathLike[str], directory: bool) -> Path:
    """Where the manifest of the entry ``path`` lives (inside a folder entry, beside a file)."""
    path = Path(path)
    return path / DIR_MANIFEST if directory else path.with_name(path.name + ".manifest.json")


def _sample_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 3 * _MIB:
            h.update(f.read())
        else:
            for offset in (0, size // 2, size - _MIB):
                f.seek(offset)
                h.update(f.read(_MIB))
    return h.hexdigest()


def _full_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    return {"size": size, "sha256": _full_sha256(path), "sample_sha256": _sample_sha256(path, size)}


def _files(path: Path, directory: bool) -> dict[str, Path]:
    if not directory:
        return {path.name: path}
    return {
        p.relative_to(path).as_posix(): p
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != DIR_MANIFEST
    }


def write_manifest(path: str | os.PathLike[str], *, directory: bool) -> dict[str, Any]:
    """Record (atomically, last) the files of the complete entry ``path``; returns the manifest."""
    path = Path(path)
    files = {rel: _describe(p) for rel, p in _files(path, directory).items()}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    write_json_atomic(manifest_path(path, directory), manifest, indent=1)
    return manifest


def verify(
    path: str | os.PathLike[str], *, directory: bool, full: bool = False, expected_sha256: str | None = None
) -> str | None:
    """Why the entry ``path`` is not valid (one short phrase), or None when it is.

    Checks every listed file's size and sample sha256; ``full`` also checks the full sha256
    (reads everything). ``expected_sha256`` (file entries): the recorded sha256 must equal it."""
    path = Path(path)
    if not (path.is_dir() if directory else path.is_file()):
        return "missing" if not path.exists() else f"not a {'folder' if directory else 'file'}"
    try:
        manifest = json.loads(manifest_path(path, directory).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest (made by an older version or interrupted)"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    if not isinstance(manifest, dict):
        return "foreign manifest"
    files = manifest.get("files")
    if (
        manifest.get("format") != MANIFEST_FORMAT
        or manifest.get("version") != MANIFEST_VERSION
        or (not isinstance(files, dict) or not files)
    ):
        return "foreign or outdated manifest"
    if expected_sha256 is not None and files.get(path.name, {}).get("sha256") != expected_sha256:
        return "sha256 differs from the expected one"
    for rel, want in files.items():
        p = path / rel if directory else path
        try:
            size = p.stat().st_size
            if size != want["size"]:
                return f"{rel}: {size} bytes, expected {want['size']}"
            if _sample_sha256(p, size) != want["sample_sha256"]:
                return f"{rel}: content differs"
            if full and _full_sha256(p) != want["sha256"]:
                return f"{rel}: sha256 differs"
        except FileNotFoundError:
            return f"{rel}: missing"
        except (OSError, KeyError, TypeError) as err:
            return f"{rel}: unreadable ({err})"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<parent>/.<name>.lock`` (OSError if it cannot be made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _can_not(path: Path, reason: str | None, err: BaseException) -> CacheError:
    detail = getattr(err, "strerror", None) or str(err)
    if getattr(err, "filename", None):
        detail = f"{detail}: {err.filename}"  # type: ignore[attr-defined]
    if reason is None:
        return CacheError(f"cannot create the cache entry {path}: {detail}; {_HINT}")
    return CacheError(
        f"the cache entry {path} is damaged ({reason}) and cannot be rebuilt: {detail}; "
        f"delete {path} or {_HINT}"
    )


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a folder is renamed away first, so it vanishes at once)."""
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _rebuild(
    path: Path,
    build: Callable[[Path], Any],
    *,
    directory: bool,
    failed_load: str | None = None,
    expected_sha256: str | None = None,
) -> Any:
    """Under the entry's lock: re-check it, and if still not valid (or it ``failed_load``) build
    it anew. Returns what ``build`` returned, or None when another process had rebuilt it."""

    def damage() -> str | None:  # None: valid, or absent (a first build, not a repair)
        if not (path.exists() or path.is_symlink() or manifest_path(path, directory).exists()):
            return None
        return failed_load or verify(path, directory=directory, expected_sha256=expected_sha256)

    reason = damage()
    try:
        with _locked(path):
            found = verify(path, directory=directory, expected_sha256=expected_sha256)
            if found is None and failed_load is None:
                return None  # valid now: built by another process while we waited
            reason = damage()
            if reason is not None:
                log.warning("hierspec: the cache entry %s is damaged (%s); rebuilding it", path, reason)
            for stale in [*path.parent.glob(f".tmp-{path.name}-*"), *path.parent.glob(f".{path.name}.*.tmp")]:
                _remove(stale)  # left by crashed builds (we hold the lock)
            return (_build_dir if directory else _build_file)(path, build, expected_sha256)
    except OSError as err:
        if isinstance(err, CacheError) or err.errno not in _WRITE_ERRNOS:
            raise
        raise _can_not(path, reason, err) from None


def _build_dir(path: Path, build: Callable[[Path], Any], _: str | None) -> Any:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        result = build(tmp)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; some writers make 0600 files
            p.chmod(0o755 if p.is_dir() else 0o644)
        write_manifest(tmp, directory=True)
        if path.exists() or path.is_symlink():
            _remove(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _build_file(path: Path, build: Callable[[Path], Any], expected_sha256: str | None) -> Any:
    result: list[Any] = []

    def write(tmp: Path) -> None:
        result.append(build(tmp))
        if expected_sha256 is not None and (got := _full_sha256(tmp)) != expected_sha256:
            raise CacheError(f"built {path} has sha256 {got}, expected {expected_sha256}")

    manifest_path(path, False).unlink(missing_ok=True)  # the old one no longer describes the file
    if path.is_dir() and not path.is_symlink():
        _remove(path)
    write_atomic(path, write)
    write_manifest(path, directory=False)
    return result[0]


def verified_file(
    path: str | os.PathLike[str],
    build: Callable[[Path], Any],
    *,
    expected_sha256: str | None = None,
    full: bool = False,
) -> Path:
    """A valid cached file at ``path``; if missing or damaged, ``build(tmp)`` writes it to the
    temporary ``tmp`` (same folder) under the lock, which is then renamed into place and given
    a manifest. ``expected_sha256``: the built file must have it (else CacheError, nothing
    kept). Raises CacheError if it cannot be built; errors of ``build`` itself propagate."""
    path = Path(path)
    if verify(path, directory=False, full=full, expected_sha256=expected_sha256) is not None:
        _rebuild(path, build, directory=False, expected_sha256=expected_sha256)
    return path


def verified_dir(path: str | os.PathLike[str], build: Callable[[Path], Any], *, full: bool = False) -> Path:
    """A valid cached folder at ``path``; if missing or damaged, ``build(tmp)`` fills the empty
    temporary folder ``tmp``, which is then given a manifest and renamed into place."""
    path = Path(path)
    if verify(path, directory=True, full=full) is not None:
        _rebuild(path, build, directory=True)
    return path


def load_verified(
    path: str | os.PathLike[str],
    build: Callable[[Path], T | None],
    load: Callable[[Path], T],
    *,
    directory: bool = True,
) -> T:
    """``load(path)`` of a valid entry, (re)building it first if needed. If ``build`` returns
    a value, that value is used as the loaded entry (saves reading back what was just built).
    If ``load`` raises on an entry that passed the check, the entry is treated as damaged:
    rebuilt once (one warning) and loaded again; a second failure propagates."""
    path = Path(path)
    if verify(path, directory=directory) is not None:
        built = _rebuild(path, build, directory=directory)
        if built is not None:
            return built
    try:
        return load(path)
    except Exception as err:  # any failure to load a checked entry means damage
        failed = f"fails to load: {type(err).__name__}: {err}".splitlines()[0][:200]
    built = _rebuild(path, build, directory=directory, failed_load=failed)
    return built if built is not None else load(path)


def read_json_cache(path: str | os.PathLike[str], validate: Callable[[Any], bool] | None = None) -> Any:
    """The JSON object cached at ``path``, or None if there is none (silently) or it is
    unreadable, not JSON, or ``validate(obj)`` is false or raises (one warning line: the caller
    rebuilds it and overwrites it with `write_json_cache`). Atomic writes make a manifest
    unnecessary: a JSON file that parses and validates is complete."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if validate is None or validate(obj):
            return obj
        why = "unexpected content"
    except FileNotFoundError:
        return None
    except Exception as err:  # any bad content means "rebuild"
        why = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    log.warning("hierspec: ignoring the damaged cache file %s (%s); rebuilding it", path, why)
    return None


def write_json_cache(path: str | os.PathLike[str], obj: Any, **dump_kw: Any) -> bool:
    """Write ``obj`` atomically as JSON to ``path``; if the cache is not writable, log one
    warning line and return False (a cache is an optimisation: the caller goes on)."""
    try:
        write_json_atomic(path, obj, **dump_kw)
        return True
    except OSError as err:
        log.warning("hierspec: cannot write the cache file %s (%s); %s", path, err.strerror or err, _HINT)
        return False
