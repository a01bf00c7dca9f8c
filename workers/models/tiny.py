"""Builds the test model, `abl-tiny`, offline and reproducibly.

Seeded random Llama weights (7M parameters, a 65,536-token context), a byte-level BPE tokenizer
trained on Python's own stdlib sources, and a ChatML-like chat template. The text it generates
is meaningless; everything around it is real. Two builds on the same Python and library versions
are byte-identical. The folder's manifest (`abl-model.json`) names the recipe and its version: a
folder built by another version (or holding another model) is built again.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from contract.catalog import TEST_MODEL_ID
from workers.models.gguf import MANIFEST_FILE, read_manifest

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_turn|>"
PAD_TOKEN = "<|pad|>"
START_TOKEN = "<|start|>"
# Ids follow this order (the trainer puts special tokens first): bos=0, eos=1, pad=2, start=3.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_TOKEN]

VOCAB_SIZE = 8000
# Positions the model takes: long enough for an agent client's first request.
CONTEXT_WINDOW = 65_536
# Bump when the build's output changes: folders of another version are rebuilt.
RECIPE_VERSION = 2
MANIFEST = {"source_kind": "built-in", "source": "tiny", "recipe_version": RECIPE_VERSION}
# Enough text for a useful 8k vocabulary while keeping training around a second.
TRAINING_CHARS = 5_000_000
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|start|>' + message['role'] + '\\n' + message['content'] + '<|end_of_turn|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)


def is_built(folder: Path) -> bool:
    """Whether `folder` holds a complete build of this recipe's version."""
    found = read_manifest(folder) or {}
    return (
        all(found.get(k) == v for k, v in MANIFEST.items())
        and (folder / "config.json").is_file()
        and any((folder / f).is_file() for f in WEIGHT_FILES)
    )


def training_files() -> list[Path]:
    """The stdlib sources the tokenizer learns from, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Top-level modules only: no site-packages, no test suite; sorted so the corpus is stable.
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def training_corpus() -> Iterator[str]:
    """Yields the training text, file by file, capped at TRAINING_CHARS."""
    total = 0
    for path in training_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= TRAINING_CHARS:
            break


def build_tokenizer() -> Tokenizer:
    """Trains the byte-level BPE tokenizer (deterministic for a given corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No automatic BOS: the chat template writes it, so prompts are tokenized without extras.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer


def _write_model(folder: Path) -> None:
    """Writes tokenizer, weights, config and generation config into `folder`."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    raw = build_tokenizer()
    ids = {tok: raw.token_to_id(tok) for tok in SPECIAL_TOKENS}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=CONTEXT_WINDOW,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=672,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_WINDOW,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
    )
    model.save_pretrained(folder)
    # Last: a folder holds a manifest only once everything else is written.
    (folder / MANIFEST_FILE).write_text(json.dumps(MANIFEST, indent=2) + "\n")


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock beside `dest`, so two processes starting at once build only once."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_tiny_model(dest: Path, *, force: bool = False) -> Path:
    """Builds the test model into `dest` unless it is already there; returns `dest`."""
    dest = Path(dest).absolute()
    if is_built(dest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        # Another process may have finished the build while we waited for the lock.
        if is_built(dest) and not force:
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        try:
            _write_model(tmp)
            # mkdtemp makes 0700 and safetensors writes 0600: other users (the API) must read it.
            tmp.chmod(0o755)
            for path in tmp.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            _swap_into_place(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Renames the finished build onto `dest`; a stale or partial `dest` is moved aside first."""
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in `folder`, by relative path (to check reproducibility)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    from contract.settings import CoreSettings

    parser = argparse.ArgumentParser(description="Build the test model offline.")
    parser.add_argument("dest", nargs="?", type=Path, help="target folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    dest = args.dest or CoreSettings().models_dir / TEST_MODEL_ID
    path = build_tiny_model(dest, force=args.force)
    for name, digest in folder_digest(path).items():
        print(f"{digest}  {name}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
