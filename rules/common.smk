# Shared helpers: the typed config (a typo fails here, before any job) and path helpers.
import shlex

import fluxpipe
from fluxpipe import workflow as fw
from fluxpipe.config import load_pipeline

CFG = load_pipeline(config)
# the merged settings of this run (config files and --config values), passed on to each `fluxpipe` command
CONFIG_ARGS = f"--config {shlex.quote(fw.effective_config_file(config))}"
FLUXPIPE_VERSION = fluxpipe.__version__
VALIDATE_REPORT = fw.VALIDATE_REPORT


wildcard_constraints:
    shard=r"\d{3}",


def manifest_file(wildcards):
    """The manifest, once its checkpoint ran; ancient(): a rewritten manifest alone reruns no shard."""
    return ancient(checkpoints.dataset_manifest.get().output[0])
