# Shared helpers: the typed config (a typo fails here, before any job) and path helpers.
import os
import shlex

from snakemake.exceptions import WorkflowError

from snakemake.exceptions import IncompleteCheckpointException

import fluxpipe
from fluxpipe import workflow as fw

CFG = fw.load_or_exit(config)  # bad settings: one `fluxpipe: error:` line, exit status 2
# the merged settings of this run (config files and --config values), passed on to each `fluxpipe` command as
# `--config-json "$FLUXPIPE_CONFIG_JSON"`: an environment variable, not a params entry (each rule's params name
# the settings it depends on, so that an unrelated edit reruns nothing); a cluster job parses this file again
os.environ["FLUXPIPE_CONFIG_JSON"] = fw.config_json(config)
FLUXPIPE_VERSION = fluxpipe.__version__
VALIDATE_REPORT = fw.VALIDATE_REPORT
# shard jobs of the two caches: cache.latent_shards / text_shards, or with "auto" one per 500 images (1 to 16)
LATENT_SHARDS = fw.shard_count(CFG, "latents")
TEXT_SHARDS = fw.shard_count(CFG, "text")


wildcard_constraints:
    shard=r"\d{3}",
    method="lora|full|controlnet",
    end=r"\d{8}",


def all_cores():
    """What --cores allows (training and the encoders take all of it); without --cores (a cluster run given only
    --jobs) this machine's CPU count, which --set-threads overrides per rule."""
    try:
        return int(workflow.cores)
    except (WorkflowError, TypeError, ValueError):
        return os.cpu_count() or 1


def shared_cores(jobs):
    """The threads of one of ``jobs`` shard jobs that run side by side."""
    return max(1, all_cores() // max(1, jobs))


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


def run_report_outputs(method, category):
    """run.html (everything in one page), curves.png and dataset.png of one method, for the report."""
    out = f"{fw.RESULTS}/report/{method}"
    return {
        "html": report(
            f"{out}/run.html",
            caption="../report/run_settings.rst",
            category=category,
            labels={"figure": "settings, timings, metrics, dataset"},
        ),
        "curves": report(
            f"{out}/curves.png",
            caption="../report/run_curves.rst",
            category=category,
            labels={"figure": "loss, lr, s/step, peak memory"},
        ),
        "dataset": report(
            f"{out}/dataset.png",
            caption="../report/run_dataset.rst",
            category=category,
            labels={"figure": "dataset preview"},
        ),
    }


RUN_REPORT_SHELL = (
    "fluxpipe run-report {params.method} --out {params.out:q} --manifest {input.manifest:q} "
    "--validate-report {input.report:q} {params.metrics} {params.flags:q} > {log:q} 2>&1"
)
