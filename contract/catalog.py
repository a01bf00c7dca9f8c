"""The model catalogue: which models exist, where their folders are, what they cost.

Torch-free: the API reads it to validate requests and price them; workers read it to load models.
"""

import fnmatch
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_MODEL_ID = "abliterated-model"
# The engines a worker can run a model with (workers/backends): "transformers" for any Hugging
# Face causal LM, "echo" for tests (repeats the prompt, needs no weights).
BackendName = Literal["transformers", "echo"]


class ModelSpec(BaseModel):
    """One servable model."""

    id: str
    display_name: str
    # Hugging Face causal-LM folder; relative paths are resolved against $ABL_DATA_DIR/models.
    folder: str
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    # USD per million tokens.
    input_price_per_mtok: Decimal = Field(ge=0)
    output_price_per_mtok: Decimal = Field(ge=0)
    # Prompt caching (docs/caching.md): prompt tokens read from the cache, and written to it,
    # cost the input price times these (Anthropic's 0.1x and 1.25x); a prefix shorter than
    # `min_cacheable_tokens` is not cached.
    cache_read_multiplier: Decimal = Field(default=Decimal("0.1"), ge=0)
    cache_write_multiplier: Decimal = Field(default=Decimal("1.25"), ge=0)
    min_cacheable_tokens: int = Field(default=1024, ge=1)
    # Celery queue whose workers serve this model.
    queue: str
    # The engine that serves it.
    backend: BackendName = "transformers"
    created_at: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    # Other model ids clients may send for this model: exact ids, or glob patterns such as
    # "claude-*" (fnmatch: * ? [seq]). None by default; an operator adds them so that a
    # client's built-in model ids (Claude Code's) run on a served model.
    aliases: list[str] = Field(default_factory=list)

    def path(self, models_dir: Path) -> Path:
        folder = Path(self.folder)
        return folder if folder.is_absolute() else models_dir / folder


DEFAULT_MODEL = ModelSpec(
    id=DEFAULT_MODEL_ID,
    display_name="Abliterated Model (built locally)",
    folder=DEFAULT_MODEL_ID,
    context_window=2048,
    max_output_tokens=1024,
    input_price_per_mtok=Decimal("5"),
    output_price_per_mtok=Decimal("5"),
    queue=DEFAULT_MODEL_ID,
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
    """The default model plus any in the JSON list at `models_file` (same fields as ModelSpec)."""
    models = [DEFAULT_MODEL]
    if models_file is not None:
        extra = json.loads(Path(models_file).read_text())
        models.extend(ModelSpec.model_validate(item) for item in extra)
    return Catalog(models)
