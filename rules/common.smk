# Shared helpers: the typed config (a typo fails here, before any job) and path helpers.
import shlex

from snakemake.exceptions import IncompleteCheckpointException

import fluxpipe
from fluxpipe import workflow as fw

CFG = fw.load_or_exit(config)  # bad settings: one `fluxpipe: error:` line, exit status 2
# the merged settings of this run (config files and --config values), passed on to each `fluxpipe` command
CONFIG_ARGS = fw.config_args(config)
FLUXPIPE_VERSION = fluxpipe.__version__
VALIDATE_REPORT = fw.VALIDATE_REPORT


wildcard_constraints:
    shard=r"\d{3}",
    method="lora|full|controlnet",
    end=r"\d{8}",


def manifest_file(wildcards):
    """The manifest, once its checkpoint ran; ancient(): a rewritten manifest alone reruns no shard."""
    return ancient(checkpoints.dataset_manifest.get().output[0])


def validated(wildcards):
    """The validate report, once its checkpoint ran. Snakemake plans the later jobs again then, each by its own
    params (the sha256 of the files it uses); ancient(): a rewritten report alone reruns nothing. Ancient while
    the checkpoint is pending too, else Snakemake plans every later job then and keeps that stale reason."""
    try:
        return ancient(checkpoints.validate_models.get().output[0])
    except IncompleteCheckpointException as e:
        return ancient(e.targetfile)


def validated_settings(settings):
    """params: a rule's settings digest, naming the validated files it uses (fw.latent_params, ...)."""
    return lambda wildcards: settings(CFG, checkpoints.validate_models.get().output[0])


def last_segment(method):
    """The state the final job resumes when the run is segmented (the manifest tells how many steps it has)."""

    def inner(wildcards):
        if not CFG.train_segment_steps:
            return []
        ends = fw.segment_ends(CFG, method, checkpoints.dataset_manifest.get().output[0])
        return [fw.segment_state(CFG, method, ends[-1])] if ends else []

    return inner


def resume_flag(wildcards, input):
    """A segmented run's final job resumes the last segment; otherwise the newest state, if any."""
    return f"--resume {shlex.quote(input.segment[0])}" if input.segment else "--auto_resume"
