"""Train an unconditional DDPM on a dataset's images and save the DDPMPipeline (EMA weights).

    python scripts/train_ddpm.py DATASET --output-dir ddpm [--resolution 32 --channels 1 ...]
    accelerate launch scripts/train_ddpm.py DATASET --output-dir ddpm ...

DATASET is a Hub id, a local folder (imagefolder, parquet, a `save_to_disk` folder) or a parquet
file. Every other option is a field of `hf_influence.TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

from accelerate import Accelerator

from hf_influence import TrainConfig, train_ddpm
from hf_influence.datasets_io import load_training_dataset


def field_help(config_class: type) -> dict[str, str]:
    """Each field's description from the "Attributes:" section of the class docstring."""
    attributes = inspect.cleandoc(config_class.__doc__ or "").partition("Attributes:")[2].strip()
    entries = re.split(r"\n    (?=\w+:)", attributes)
    return {name.strip(): " ".join(text.split()) for name, _, text in (entry.partition(":") for entry in entries)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="Hub id, local folder or parquet file of the training images")
    parser.add_argument("--split", default="train")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    parser.add_argument("--output-dir", required=True, help="where the pipeline and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    helps = field_help(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        option, default = "--" + field.name.replace("_", "-"), field.default
        kwargs = {"default": default, "help": f"{helps[field.name]} (default: {default})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=type(default[0]))
        else:
            kwargs["type"] = str if default is None else type(default)
        parser.add_argument(option, **kwargs)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = TrainConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)})
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    dataset = load_training_dataset(args.dataset, args.split, args.streaming)
    train_ddpm(dataset, config, args.output_dir, accelerator=accelerator, resume=args.resume)
    if accelerator.is_main_process:
        print(f"Saved the DDPMPipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
