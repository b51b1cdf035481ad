"""Find the training examples that most support (proponents) and oppose (opponents) query images.

    python scripts/attribute.py --pipeline ddpm --factors factors --index index --dataset digits \
        --image query.png --top-k 8 --output-dir attribution
    python scripts/attribute.py ... --generate 4 --seed 0 --num-inference-steps 50 --output-dir attribution

Prints each query's top-k ids and scores and writes attribution.json and one PNG grid per query.
Same as `hf-influence attribute`.
"""

from hf_influence.cli import run_script

if __name__ == "__main__":
    run_script("attribute", __doc__)
