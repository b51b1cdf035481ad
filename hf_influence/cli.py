"""The `hf-influence` command line: `train-ddpm`, `fit-factors`, `build-index`, `attribute` and `lds`.

Each subcommand is also a script in `scripts/` (runnable with `python` or `accelerate launch`);
both call the functions here, so the options and behaviour are the same either way.

    hf-influence fit-factors --pipeline ddpm --dataset digits --output-dir factors
    accelerate launch scripts/build_index.py --pipeline ddpm --dataset digits --output-dir index
    hf-influence attribute --pipeline ddpm --factors factors --index index --dataset digits --generate 4
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------- shared helpers


def field_help(config_class: type) -> dict[str, str]:
    """Each field's description from the "Attributes:" section of the class docstring."""
    attributes = inspect.cleandoc(config_class.__doc__ or "").partition("Attributes:")[2].strip()
    entries = re.split(r"\n    (?=\w+:)", attributes)
    return {name.strip(): " ".join(text.split()) for name, _, text in (entry.partition(":") for entry in entries)}


def add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One `--option` per field of a config dataclass, typed from its annotation, so a new field
    reaches the command line without touching this module; a renamed field keeps its old option too."""
    helps = field_help(config_class)
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(f"{config_class.__name__} fields")
    for field in dataclasses.fields(config_class):
        described = helps.get(field.name, f"see {config_class.__name__}.{field.name}")
        if field.default is dataclasses.MISSING:  # a field without a default is a required option
            kwargs = {"required": True, "help": described}
        else:
            kwargs = {"default": field.default, "help": f"{described} (default: {field.default})"}
        group.add_argument(_option(field.name), **kwargs, **_typed(hints[field.name]))
    for old, new in getattr(config_class, "RENAMED_FIELDS", {}).items():
        alias = {"dest": new, "action": DeprecatedAlias, "replacement": _option(new)}
        group.add_argument(_option(old), **alias, **_typed(hints[new], flag=False), help=f"deprecated: {_option(new)}")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(hint: Any, flag: bool = True) -> dict[str, Any]:
    """How argparse reads a field of type `hint`: a bool as `--x/--no-x` (`flag`), a tuple as several values."""
    if hint is bool and flag:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    return {"type": next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)}


def config_from_args(args: argparse.Namespace, config_class: type) -> Any:
    return config_class(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config_class)})


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline and training-set options that fitting, indexing and attribution share."""
    parser.add_argument("--pipeline", required=True, help="saved diffusers pipeline folder or Hub id")
    parser.add_argument("--dataset", required=True, help="training set: Hub id, local folder or parquet file")
    parser.add_argument("--split", default="train")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    parser.add_argument("--pipeline-revision", help="branch, tag or commit of a Hub pipeline")
    parser.add_argument("--dataset-revision", help="branch, tag or commit of a Hub dataset")
    parser.add_argument(
        "--image-column",
        default=None,
        help="dataset column with the images (default: the pipeline's training_config.json, else 'image')",
    )
    parser.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether training flipped images at random; must match training "
        "(default: the pipeline's training_config.json, else off)",
    )
    parser.add_argument(
        "--label-column",
        help="dataset column with each image's class label: the condition of a class-conditional pipeline (DiT); "
        "attribute also prints it beside each id (default there: 'label', when the dataset has one)",
    )
    parser.add_argument(
        "--class-column",
        dest="label_column",
        action=DeprecatedAlias,
        replacement="--label-column",
        help="deprecated spelling of --label-column",
    )
    parser.add_argument("--caption-column", help="dataset column with each image's caption (text-to-image)")
    parser.add_argument(
        "--condition-dropout",
        type=float,
        default=0.0,
        help="rate at which training dropped captions/classes for classifier-free guidance (default: 0)",
    )
    from .timestep_densities import DENSITIES, LOSS_WEIGHTINGS

    family = parser.add_argument_group("pipeline family options (docs/adding_a_pipeline.md)")
    family.add_argument("--resolution", type=int, help="training images' side in pixels (default: the denoiser's)")
    family.add_argument(
        "--timestep-density", choices=DENSITIES, help="how training drew timesteps (default: the family's own)"
    )
    family.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default="none", help="training's loss weighting")
    family.add_argument("--original-size-column", help="SDXL: column of each image's original (height, width)")
    family.add_argument("--crop-column", help="SDXL: column of each image's crop (top, left)")
    family.add_argument(
        "--guidance-embedding",
        type=float,
        help="Flux.1-dev: the guidance value its denoiser is given (default: the pipeline's)",
    )


class DeprecatedAlias(argparse.Action):
    """An option's old spelling: it still works, storing into the new option's destination, with a
    warning that names the new spelling so that scripts get updated."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        warnings.warn(f"{option_string} is deprecated; use {self.replacement}.", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --output-dir even when it holds something else (its files may be replaced)",
    )


def add_push_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help=f"also upload the {what} to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")


def pipeline_from_args(args: argparse.Namespace, device: Any) -> tuple[Any, Any]:
    """The `--pipeline` on `device` and its DiffusionTask (see `pipelines.load_pipeline`)."""
    from .pipelines import load_pipeline

    options = {"original_size_column": args.original_size_column, "crop_column": args.crop_column}
    if args.guidance_embedding is not None:
        options["guidance_scale"] = args.guidance_embedding
    return load_pipeline(
        args.pipeline,
        args.pipeline_revision,
        device,
        image_column=args.image_column,
        random_flip=args.random_flip,
        label_column=args.label_column,
        caption_column=args.caption_column,
        condition_dropout=args.condition_dropout,
        resolution=args.resolution,
        timestep_density=args.timestep_density,
        loss_weighting=args.loss_weighting,
        conditioning_options={name: value for name, value in options.items() if value is not None},
    )


def load_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    """The `--dataset` split and its `DatasetSource` (a Hub revision resolved to its commit)."""
    from .datasets_io import load_training_dataset, resolve_dataset_source

    source = resolve_dataset_source(
        args.dataset, args.split, args.dataset_revision, getattr(args, "id_column", None) or "id"
    )
    return load_training_dataset(args.dataset, args.split, args.streaming, source.revision), source


# ---------------------------------------------------------------------------- train-ddpm


def add_train_ddpm_arguments(parser: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    parser.add_argument("dataset", help="Hub id, local folder or parquet file of the training images")
    parser.add_argument("--split", default="train")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    parser.add_argument("--output-dir", required=True, help="where the pipeline and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    add_overwrite_argument(parser)
    parser.add_argument("--dataset-revision", help="branch, tag or commit of a Hub dataset")
    add_push_arguments(parser, "pipeline (without the checkpoints)")
    add_config_options(parser, TrainConfig)


def run_train_ddpm(args: argparse.Namespace) -> None:
    """Train an unconditional DDPM on a dataset's images and save the DDPMPipeline (EMA weights)."""
    from accelerate import Accelerator

    from .training import TrainConfig, train_ddpm

    config = config_from_args(args, TrainConfig)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    dataset, _ = load_dataset(args)
    train_ddpm(dataset, config, args.output_dir, accelerator=accelerator, resume=args.resume, overwrite=args.overwrite)
    if accelerator.is_main_process:
        print(f"Saved the DDPMPipeline to {args.output_dir}")
        if args.push_to_hub:
            from .hub import push_folder

            commit = push_folder(
                args.output_dir, args.push_to_hub, "model", ignore=["checkpoints/*"], private=args.private or None
            )
            print(f"Pushed the pipeline to {commit.commit_url}")


# ---------------------------------------------------------------------------- fit-factors


def add_fit_factors_arguments(parser: argparse.ArgumentParser) -> None:
    from .factors import FactorConfig

    add_data_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="where the factors are saved")
    parser.add_argument("--checkpoint-dir", help="save each process's running sums here, to resume after a crash")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue the fit checkpointed in --checkpoint-dir")
    add_overwrite_argument(parser)
    add_push_arguments(parser, "factors")
    add_config_options(parser, FactorConfig)


def run_fit_factors(args: argparse.Namespace) -> None:
    """Fit K-FAC / EK-FAC factors of the pipeline's denoiser on the training set and save them."""
    from accelerate import Accelerator

    from .artifacts import check_output_folder
    from .factors import FactorConfig, InfluenceFactors
    from .fitting import fit_factors

    config = config_from_args(args, FactorConfig)
    # Before the fit: a folder that cannot take the factors is refused now, not after hours of fitting.
    check_output_folder(Path(args.output_dir), InfluenceFactors.FORMAT, InfluenceFactors.DESCRIPTION, args.overwrite)
    accelerator = Accelerator()
    _, task = pipeline_from_args(args, accelerator.device)
    dataset, source = load_dataset(args)
    factors = fit_factors(
        task,
        dataset,
        config,
        accelerator=accelerator,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        dataset_source=source,
    )
    if accelerator.is_main_process:
        factors.save_pretrained(args.output_dir, overwrite=args.overwrite)
        print(f"Saved {factors.strategy} factors of {len(factors.modules)} layers to {args.output_dir}")
        if args.push_to_hub:
            commit = factors.push_to_hub(args.push_to_hub, private=args.private or None)
            print(f"Pushed the factors to {commit.commit_url}")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------- build-index


def add_build_index_arguments(parser: argparse.ArgumentParser) -> None:
    from .index import IndexConfig

    add_data_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="where the index shards are written (resumable)")
    parser.add_argument(
        "--factors",
        help="K-FAC / EK-FAC factors (a folder or Hub id) for --compression eigenbasis, which a "
        "--max-bytes-per-example budget then chooses",
    )
    parser.add_argument("--factors-revision", help="branch, tag or commit of Hub factors")
    add_overwrite_argument(parser)
    add_push_arguments(parser, "index (a dataset repo)")
    add_config_options(parser, IndexConfig)


def run_build_index(args: argparse.Namespace) -> None:
    """Compute and store every training example's compressed loss gradient."""
    from accelerate import Accelerator

    from .factors import InfluenceFactors
    from .index import IndexConfig, build_index

    config = config_from_args(args, IndexConfig)
    accelerator = Accelerator()
    _, task = pipeline_from_args(args, accelerator.device)
    factors = None
    if args.factors:
        factors = InfluenceFactors.from_pretrained(args.factors, task=task, revision=args.factors_revision)
    dataset, source = load_dataset(args)
    index = build_index(
        task,
        dataset,
        config,
        args.output_dir,
        accelerator=accelerator,
        dataset_source=source,
        overwrite=args.overwrite,
        factors=factors,
    )
    if accelerator.is_main_process:
        size = index.metadata.bytes_per_example
        print(f"Indexed {len(index)} examples in {args.output_dir} ({index.config.compression}, {size} bytes each)")
        if args.push_to_hub:
            commit = index.push_to_hub(args.push_to_hub, private=args.private or None)
            print(f"Pushed the index to {commit.commit_url}")


# ---------------------------------------------------------------------------- attribute


def add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    from .attribution import DEFAULT_DAMPING
    from .measurements import MEASUREMENTS

    add_data_arguments(parser)
    parser.add_argument("--factors", required=True, help="factors: a folder (fit-factors --output-dir) or Hub id")
    parser.add_argument("--factors-revision", help="branch, tag or commit of Hub factors")
    parser.add_argument("--index", required=True, help="gradient index: a folder (build-index --output-dir) or Hub id")
    parser.add_argument("--index-revision", help="branch, tag or commit of a Hub index")
    parser.add_argument("--id-column", default="id", help="dataset column with the ids the index was built with")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--image", nargs="+", metavar="FILE", help="query images (PNG files)")
    queries.add_argument("--generate", type=int, metavar="N", help="generate N query images with the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images and the query draws")
    parser.add_argument(
        "--label", nargs="+", help="class of each query, an id or a class name (class-conditional pipelines)"
    )
    parser.add_argument("--prompt", nargs="+", help="prompt of each query (text-to-image pipelines)")
    parser.add_argument("--guidance-scale", type=float, help="guidance scale of --generate (default: the pipeline's)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="sampling steps for --generate")
    parser.add_argument("--measurement", default="loss", choices=sorted(MEASUREMENTS))
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING, help="λ added to the curvature")
    parser.add_argument("--top-k", type=int, default=8, help="proponents and opponents shown per query")
    parser.add_argument(
        "--candidates",
        type=int,
        help="with an index that has a search sketch (--search-dim): examples rescored exactly per query and side "
        "(default: 1024, or --top-k if larger)",
    )
    parser.add_argument(
        "--draws-per-query",
        type=int,
        default=None,
        help="(t, ε) draws of each query's measurement (default: the index's)",
    )
    parser.add_argument(
        "--num-draws",
        type=int,
        dest="draws_per_query",
        action=DeprecatedAlias,
        replacement="--draws-per-query",
        help="deprecated spelling of --draws-per-query",
    )
    parser.add_argument("--output-dir", required=True, help="where attribution.json and the PNG grids go")


# Where a person gives a query's condition on the command line, named in the errors.
CONDITION_OPTIONS = {"labels": "--label", "prompts": "--prompt"}


def run_attribute(args: argparse.Namespace) -> None:
    """Score query images against the index and show each one's top proponents and opponents."""
    from accelerate import Accelerator

    from .queries import QueryConditions

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.generate is not None and args.generate < 1:
        raise ValueError(f"--generate must be at least 1, got {args.generate}.")
    accelerator = Accelerator()
    if not accelerator.is_main_process:  # a query is one process's work; the others would race on the outputs
        return
    pipeline, task = pipeline_from_args(args, accelerator.device)
    dataset, _ = load_dataset(args)
    attributor = load_attributor(args, task)
    count = len(args.image) if args.image else args.generate
    conditions = QueryConditions.for_task(task, count, args.label, args.prompt, options=CONDITION_OPTIONS)
    images, sources = query_images(args, pipeline, conditions)
    result = attributor.attribute(
        images,
        measurement=args.measurement,
        top_k=args.top_k,
        candidates=args.candidates,
        draws_per_query=args.draws_per_query,
        seed=args.seed,
        **conditions.attribute_kwargs(),
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = [
        show_query(args, task, dataset, result, query, image, source, output_dir)
        for query, (image, source) in enumerate(zip(images, sources, strict=True))
    ]
    summary = {"measurement": args.measurement, "damping": args.damping, "top_k": args.top_k, "queries": records}
    (output_dir / "attribution.json").write_text(json.dumps(summary, indent=2))
    print(f"Saved attribution.json and {len(records)} grids to {output_dir}")


def load_attributor(args: argparse.Namespace, task: Any) -> Any:
    """An Attributor over the `--factors` (checked against the task's model) and the `--index`."""
    from .attribution import Attributor
    from .factors import InfluenceFactors
    from .index import GradientIndex

    factors = InfluenceFactors.from_pretrained(args.factors, task=task, revision=args.factors_revision)
    index = GradientIndex.from_pretrained(args.index, revision=args.index_revision)
    return Attributor(task, factors, index, damping=args.damping)


def query_images(args: argparse.Namespace, pipeline: Any, conditions: Any) -> tuple[list[Any], list[str]]:
    """The query images and where each came from (a file, or the generation seed and position);
    generated images follow the queries' labels or prompts."""
    from PIL import Image

    from .generation import generate_images

    if args.image:
        missing = [path for path in args.image if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"Query images not found: {missing}")
        return [Image.open(path) for path in args.image], list(args.image)
    images = generate_images(pipeline, conditions, args.seed, args.num_inference_steps, args.guidance_scale)
    return images, [f"generated seed={args.seed} #{position}" for position in range(args.generate)]


def show_query(
    args: argparse.Namespace,
    task: Any,
    dataset: Any,
    result: Any,
    query: int,
    image: Any,
    source: str,
    output_dir: Path,
) -> dict[str, Any]:
    """Print one query's proponents and opponents (with their labels), save its grid; its JSON record."""
    from .display import attribution_grid

    label_column = args.label_column or "label"
    record: dict[str, Any] = {"query": source, "grid": f"query_{query}.png"}
    columns = []
    print(f"Query {query} ({source}):")
    for which in ("proponents", "opponents"):
        rows = result.rows(dataset, query, which, args.id_column)
        ids = (result.proponent_ids if which == "proponents" else result.opponent_ids)[query].tolist()
        scores = (result.proponent_scores if which == "proponents" else result.opponent_scores)[query].tolist()
        print(f"  {which}:")
        for row, example_id, score in zip(rows, ids, scores, strict=True):
            label = f"  label={row[label_column]}" if label_column in row else ""
            print(f"    id={example_id:<8} score={score: .6e}{label}")
        columns.append([row[task.image_column] for row in rows])
        record[which] = {"ids": ids, "scores": scores}
    attribution_grid(image, *columns).save(output_dir / record["grid"])
    return record


# ---------------------------------------------------------------------------- lds


def add_lds_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ground-truth", required=True, help="saved LDS ground truth: a folder or a Hub dataset repo id"
    )
    parser.add_argument("--revision", default=None, help="revision of a Hub ground-truth repo")
    parser.add_argument(
        "--scores",
        required=True,
        nargs="+",
        metavar="FILE",
        help="safetensors files of [queries, training examples] score matrices (every tensor is evaluated)",
    )
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")


def run_lds(args: argparse.Namespace) -> None:
    """Linear Datamodelling Score of score matrices against a saved ground truth (mean ± s.e. over queries)."""
    from safetensors.torch import load_file

    from .evaluation import GroundTruth, exact_retraining_ceiling, lds

    ground_truth = GroundTruth.from_pretrained(args.ground_truth, revision=args.revision)
    results = {}
    for path in args.scores:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Score file not found: {path}")
        for name, scores in load_file(path).items():
            key = name if len(args.scores) == 1 else f"{Path(path).stem}/{name}"
            results[key] = lds(scores, ground_truth)
            print(f"{key}: LDS {results[key]}")
    if ground_truth.num_seeds > 1:
        results["exact retraining (ceiling)"] = exact_retraining_ceiling(ground_truth)
        print(f"exact retraining (ceiling): {results['exact retraining (ceiling)']}")
    if args.output:
        from .files import atomic_write_text

        summary = json.dumps({name: result.as_dict() for name, result in results.items()}, indent=2)
        atomic_write_text(Path(args.output), summary)


# ---------------------------------------------------------------------------- demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_CACHE_DIR, DemoConfig

    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where every artifact is cached")
    parser.add_argument(
        "--launch", action=argparse.BooleanOptionalAction, default=True, help="serve the app once the artifacts exist"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the app listens on (0.0.0.0 for every one)")
    parser.add_argument("--port", type=int, default=7860, help="port the app listens on")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_config_options(parser, DemoConfig)


def run_demo(args: argparse.Namespace) -> None:
    """Train a small DDPM on 5000 MNIST digits, fit EK-FAC factors, index the digits and serve the
    Influence Explorer on them; each artifact is cached, so a second run starts the app at once."""
    from .demo import DemoConfig
    from .demo import run_demo as run

    artifacts = run(
        config_from_args(args, DemoConfig),
        args.cache_dir,
        launch=args.launch,
        server_name=args.host,
        server_port=args.port,
        share=args.share,
    )
    if not args.launch:
        print(f"Demo artifacts ready in {artifacts.paths['index'].parent}")


# ---------------------------------------------------------------------------- plan


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from .factors import STORAGE_DTYPES, FactorConfig
    from .index import COMPRESSIONS
    from .planning import PRESETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a shipped denoiser config")
    source.add_argument("--pipeline", help="pipeline or model folder, or Hub id (only its config.json is read)")
    parser.add_argument("--memory-gb", type=float, help="refuse (and list what would fit) above this device memory")
    parser.add_argument("--storage-gb", type=float, help="with --memory-gb: also refuse stored factors above this")
    parser.add_argument("--resolution", type=int, help="sample side in the denoiser's space (default: its config)")
    parser.add_argument(
        "--keep-covariances", action=argparse.BooleanOptionalAction, default=True, help="store A and G too"
    )
    parser.add_argument("--eigenvector-dtype", choices=STORAGE_DTYPES, help="eigenvector storage dtype")
    parser.add_argument("--index-compression", choices=COMPRESSIONS, default="none", help="index compression")
    parser.add_argument("--index-rank", type=int, default=8, help="rank per layer for --index-compression svd")
    parser.add_argument("--index-projection-dim", type=int, default=16, help="side for --index-compression projection")
    parser.add_argument("--index-quantize-bits", type=int, choices=(8,), help="8-bit index entries")
    parser.add_argument(
        "--index-max-bytes-per-example", type=int, help="an index byte budget (chooses the compression, as build-index)"
    )
    parser.add_argument("--all-layers", action="store_true", help="print every layer (default: the 12 largest)")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON instead of a table")
    add_config_options(parser, FactorConfig)


def run_plan(args: argparse.Namespace) -> None:
    """Plan a fit before any compute: per-layer factor shapes and bytes, totals, memory and a speed class."""
    from .factors import FactorConfig
    from .index import IndexConfig
    from .planning import plan

    factor_config = config_from_args(args, FactorConfig)
    index_config = IndexConfig(
        compression=args.index_compression,
        rank=args.index_rank,
        projection_dim=args.index_projection_dim,
        quantize_bits=args.index_quantize_bits,
        module_filter=factor_config.module_filter,
        max_bytes_per_example=args.index_max_bytes_per_example,
    )
    result = plan(
        args.preset or args.pipeline,
        factor_config,
        index_config,
        keep_covariances=args.keep_covariances,
        eigenvector_dtype=args.eigenvector_dtype,
        resolution=args.resolution,
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(result.to_table() if args.all_layers else result)
    if args.memory_gb is not None:
        try:
            result.check_fits(args.memory_gb * 1e9, None if args.storage_gb is None else args.storage_gb * 1e9)
        except MemoryError as error:
            raise SystemExit(str(error)) from error
        print(f"Fits in {args.memory_gb:g} GB of device memory.")


# ---------------------------------------------------------------------------- space


def add_space_arguments(parser: argparse.ArgumentParser) -> None:
    from .explorer import ExplorerConfig

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--push-to-hub", metavar="REPO_ID", help="deploy to this Space repo (created if needed)")
    target.add_argument("--output-dir", help="only assemble the Space in this folder (to inspect or push later)")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    add_overwrite_argument(parser)
    add_config_options(parser, ExplorerConfig)


def run_space(args: argparse.Namespace) -> None:
    """Deploy the Influence Explorer on your pipeline, factors, index and dataset as a Hugging Face Space: the
    app, its card, requirements, the hf_influence package and the settings, in one commit."""
    from .explorer import ExplorerConfig
    from .explorer.deploy import assemble_space, push_space

    config = config_from_args(args, ExplorerConfig)
    if args.output_dir:
        print(f"Assembled the Space in {assemble_space(args.output_dir, config, overwrite=args.overwrite)}")
        return
    commit = push_space(args.push_to_hub, config, private=args.private or None)
    print(f"Deployed the Space: {commit.commit_url}")


# ---------------------------------------------------------------------------- entry points

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "train-ddpm": (add_train_ddpm_arguments, run_train_ddpm),
    "fit-factors": (add_fit_factors_arguments, run_fit_factors),
    "build-index": (add_build_index_arguments, run_build_index),
    "attribute": (add_attribute_arguments, run_attribute),
    "lds": (add_lds_arguments, run_lds),
    "demo": (add_demo_arguments, run_demo),
    "plan": (add_plan_arguments, run_plan),
    "space": (add_space_arguments, run_space),
}


# What a wrong argument, value, file or folder raises: exit status 2, like argparse's own usage errors.
# Anything else (a failure while running: out of memory, a broken download, a bug) exits with 1.
USAGE_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError)
DEBUG_VARIABLE = "HFI_DEBUG"


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the full traceback of an error (or set {DEBUG_VARIABLE}=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `hf-influence` parser: one subcommand per script in scripts/."""
    parser = argparse.ArgumentParser(
        prog="hf-influence", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_debug_option(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=run.__doc__, description=run.__doc__)
        add_arguments(subparser)
        add_debug_option(subparser)
    return parser


def run_reporting_errors(run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a subcommand; an error ends it with `error: <one line>` on stderr and exit status 2 (a usage error:
    a wrong argument, value, file or folder) or 1 (a failure), and 130 on Ctrl-C — the traceback only with
    `--debug` or `HFI_DEBUG=1`."""
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes")
    try:
        run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # every error gets its one line; --debug shows the traceback
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, KeyError):  # str(KeyError) is the quoted key alone
            message = f"missing {message}"
        print(f"error: {message}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, USAGE_ERRORS) else 1) from None


def main(argv: Sequence[str] | None = None) -> None:
    """`hf-influence SUBCOMMAND ...`: one subcommand per script in scripts/."""
    args = build_parser().parse_args(argv)
    run_reporting_errors(COMMANDS[args.command][1], args)


def run_script(command: str, description: str | None, argv: Sequence[str] | None = None) -> None:
    """What a script in scripts/ runs: one subcommand's options at top level, under the script's docstring."""
    add_arguments, run = COMMANDS[command]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    add_debug_option(parser)
    run_reporting_errors(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
