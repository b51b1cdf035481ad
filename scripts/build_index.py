"""Build the gradient index of a training set: every example's compressed loss gradient, in shards.

    python scripts/build_index.py --pipeline ddpm --dataset digits --output-dir index [--num-draws 250 ...]
    accelerate launch scripts/build_index.py ...

Every option after the data options is a field of `hf_influence.IndexConfig`. Same as `hf-influence build-index`.
"""

from hf_influence.cli import run_script

if __name__ == "__main__":
    run_script("build-index", __doc__)
