"""Influence Explorer: generate an image with a diffusion model and see which training examples made it.

Configure the Space with variables (Settings → Variables and secrets), or the same names in the
environment when running `python app.py` locally:

    HFI_PIPELINE   the diffusers pipeline: a Hub id or a folder
    HFI_FACTORS    its fitted factors (hf-influence fit-factors): a Hub id or a folder
    HFI_INDEX      its gradient index (hf-influence build-index): a Hub id or a folder
    HFI_DATASET    the indexed training set: a Hub id or a folder
    HFI_<FIELD>    any other ExplorerConfig field, e.g. HFI_SPLIT=train, HFI_TOP_K=12, HFI_DAMPING=1e-6

A Space assembled by `hf-influence space` also carries explorer.json (the same settings, used when no
HFI_ variable names the artifacts). With neither, the Space builds the bundled MNIST demo
(`hf-influence demo`) on its first start, caching it in HFI_DEMO_CACHE, and serves that.
"""

import os
from pathlib import Path

from hf_influence.demo import DEFAULT_CACHE_DIR, run_demo
from hf_influence.explorer import InfluenceExplorer, build_app, config_from_environment, serve
from hf_influence.explorer.deploy import CONFIG_FILE, config_from_file

if __name__ == "__main__":
    config = config_from_environment() or config_from_file(Path(__file__).with_name(CONFIG_FILE))
    if config is None:
        run_demo(cache_dir=os.environ.get("HFI_DEMO_CACHE", DEFAULT_CACHE_DIR))
    else:
        serve(build_app(InfluenceExplorer.from_config(config)), config)
