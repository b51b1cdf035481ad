"""Train an unconditional DDPM on a dataset's images and save the DDPMPipeline (EMA weights).

    python scripts/train_ddpm.py DATASET --output-dir ddpm [--resolution 32 --channels 1 ...]
    accelerate launch scripts/train_ddpm.py DATASET --output-dir ddpm ...

DATASET is a Hub id, a local folder (imagefolder, parquet, a `save_to_disk` folder) or a parquet
file. Every other option is a field of `hf_influence.TrainConfig`. Same as `hf-influence train-ddpm`.
"""

from hf_influence.cli import run_script

if __name__ == "__main__":
    run_script("train-ddpm", __doc__)
