"""Linear Datamodelling Score of attribution score matrices against a saved LDS ground truth.

    python scripts/lds.py --ground-truth lds/ground_truth --scores scores.safetensors
    python scripts/lds.py --ground-truth user/mnist-lds-ground-truth --scores kfac.safetensors trak.safetensors

Each tensor of each file is a [queries, training examples] score matrix (positive = removing the example
is predicted to increase the query's measurement). Prints LDS ± standard error over queries, and the
exact-retraining ceiling when the ground truth has several training seeds. Same as `hf-influence lds`.
"""

from hf_influence.cli import run_script

if __name__ == "__main__":
    run_script("lds", __doc__)
