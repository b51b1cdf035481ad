"""Hub cards for factors (a model card) and gradient indices (a dataset card).

A card says what the repo is, which pipeline and dataset it was computed from (with revisions), the
settings that matter for using it, and how to load it; its metadata (`library_name: hf_influence`,
`base_model`, `datasets`, tags) makes the repo findable and linked to its pipeline on the Hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

if TYPE_CHECKING:
    from .factors import FactorsMetadata
    from .index import IndexMetadata

TAGS = ["hf_influence", "influence-functions", "data-attribution", "diffusion"]


def _hub_id(source: Any) -> str | None:
    """A Hub repo id (`owner/name`) from a provenance record; local paths are not linked."""
    repo_id = source.repo_id
    if not repo_id or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        return None
    return repo_id


def _source_line(what: str, source: Any) -> str:
    revision = f" at revision `{source.revision}`" if source.revision else ""
    split = f", split `{source.split}`" if getattr(source, "split", None) else ""
    return f"- {what}: `{source.repo_id or 'unknown'}`{revision}{split}"


def factors_card(metadata: FactorsMetadata, repo_id: str | None = None) -> str:
    """The model card of a factors repo."""
    config, model, dataset, storage = metadata.config, metadata.model, metadata.dataset, metadata.storage
    data = ModelCardData(
        library_name="hf_influence",
        base_model=_hub_id(model),
        datasets=[_hub_id(dataset)] if _hub_id(dataset) else None,
        tags=[*TAGS, config.strategy],
    )
    name = repo_id or "PATH_OR_REPO_ID"
    body = f"""
# {config.strategy.upper()} influence factors

Curvature factors (K-FAC {config.approx}, GGN^{config.ggn}, {config.strategy.upper()}) of a diffusion
denoiser, for data attribution with the `hf_influence` library: they precondition query gradients so that
scores against a gradient index estimate how much each training example influenced a generated image.

## Computed from
{_source_line("Pipeline", model)} (denoiser `{model.denoiser}`, fingerprint `{model.fingerprint}`)
{_source_line("Dataset", dataset)}

## Settings
- {metadata.total_draws} (t, ε) draws per pass ({config.draws_per_example} per example), seed {config.seed}
- {len(metadata.modules)} layers (module filter: `{config.module_filter}`)
- eigenvectors stored as {storage.eigenvector_dtype}; covariances {"kept" if storage.covariances else "dropped"}

## Use

```python
import hf_influence as hfi

factors = hfi.InfluenceFactors.from_pretrained("{name}")
```

Loading checks the pipeline's fingerprint: factors of another model are refused.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def index_card(metadata: IndexMetadata, repo_id: str | None = None) -> str:
    """The dataset card of a gradient-index repo."""
    config, model, dataset = metadata.config, metadata.model, metadata.dataset
    data = DatasetCardData(
        pretty_name="hf_influence gradient index",
        source_datasets=[_hub_id(dataset)] if _hub_id(dataset) else None,
        tags=[*TAGS, "gradient-index"],
        library_name="hf_influence",
        base_model=_hub_id(model),
    )
    compression = config.compression + (f" + {config.quantize_bits}-bit" if config.quantize_bits else "")
    name = repo_id or "PATH_OR_REPO_ID"
    body = f"""
# Training-gradient index

Per-example training-loss gradients of a diffusion denoiser, stored raw (not preconditioned) for data
attribution with hf_influence: one index serves any damping and refitted factors.

## Computed from
{_source_line("Pipeline", model)} (denoiser `{model.denoiser}`, fingerprint `{model.fingerprint}`)
{_source_line("Dataset", dataset)} (id column `{dataset.id_column}`)

## Settings
- {metadata.num_examples} examples in {len(metadata.shards)} shards
- {config.draws_per_example} (t, ε) draws per example, seed {config.seed}
- compression: {compression}; {len(metadata.modules)} layers

## Use

```python
import hf_influence as hfi

index = hfi.GradientIndex.from_pretrained("{name}")
```
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))
