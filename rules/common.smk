# Shared helpers: the typed config (a typo fails here, before any job) and path helpers.
import shlex

import fluxpipe
from fluxpipe import workflow as fw
from fluxpipe.config import load_pipeline

CFG = load_pipeline(config)
# the config files this run uses, passed on to each `fluxpipe` command (later files override earlier ones)
CONFIG_ARGS = " ".join(f"--config {shlex.quote(str(f))}" for f in workflow.configfiles)
FLUXPIPE_VERSION = fluxpipe.__version__
VALIDATE_REPORT = fw.VALIDATE_REPORT


wildcard_constraints:
    shard=r"\d{3}",


def manifest_file(wildcards):
    """The manifest, once its checkpoint ran; ancient(): a rewritten manifest alone reruns no shard."""
    return ancient(checkpoints.dataset_manifest.get().output[0])
