"""Fit K-FAC / EK-FAC influence factors of a saved pipeline's denoiser on its training set.

    python scripts/fit_factors.py --pipeline ddpm --dataset digits --output-dir factors [--strategy kfac ...]
    ACCELERATE_USE_CPU=true accelerate launch --num_processes 2 scripts/fit_factors.py ...  # CPU processes

Every option after the data options is a field of `hf_influence.FactorConfig`. Same as `hf-influence fit-factors`.
"""

from hf_influence.cli import run_script

if __name__ == "__main__":
    run_script("fit-factors", __doc__)
