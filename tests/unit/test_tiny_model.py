import json
import stat
import threading
from pathlib import Path

import pytest
from safetensors import safe_open

from workers.models import tiny as model_build
from workers.models.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    folder_digest,
    is_built,
)


def test_build_writes_a_complete_readable_model(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    for path in tiny_model_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(tiny_model_dir.stat().st_mode) == 0o755
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        8000,
        256,
        4,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:
        params = sum(weights.get_tensor(k).numel() for k in weights.keys())  # noqa: SIM118
    assert 6_900_000 < params < 7_000_000


def test_special_tokens_and_generation_config(tiny_model_dir: Path) -> None:
    tokenizer = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [added[EOS_TOKEN]]
    assert generation["bos_token_id"] == added[BOS_TOKEN]
    assert generation["pad_token_id"] == added[PAD_TOKEN]
    assert len(tokenizer["model"]["vocab"]) == 8000


def test_existing_model_is_not_rebuilt(tiny_model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_concurrent_builds_replace_a_partial_folder_once_and_reproducibly(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []
    real_write = model_build._write_model

    def counting_write(folder: Path) -> None:
        builds.append(folder)
        real_write(folder)

    monkeypatch.setattr(model_build, "_write_model", counting_write)
    dest = tmp_path / "abl-tiny"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # a crash left a config but no weights
    assert not is_built(dest)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_tiny_model(dest))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [dest, dest]
    assert len(builds) == 1  # the second caller waited on the lock, then found it built
    assert is_built(dest)
    # No half-built folders left beside it; only the lock file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".abl-tiny.lock", dest.name]
    # Byte-identical to the session's independent build.
    assert folder_digest(dest) == folder_digest(tiny_model_dir)
