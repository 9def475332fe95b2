# fluxpipe: FLUX.1 training as a Snakemake pipeline.
#   validate model files -> cache AE latents -> cache text-encoder outputs -> train -> evaluate
# Settings: config/config.yaml (checked by fluxpipe.config.pipeline when this file is parsed).
# Every rule runs one `fluxpipe <stage>` command; the logic lives in the fluxpipe package.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/cache.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


# set by rules/common.smk: the merged settings the `fluxpipe` commands read (--config-json)
envvars:
    "FLUXPIPE_CONFIG_JSON",


# A failed job's error in the terminal (its log in logs/ keeps the rest): the `fluxpipe: error:` line, else the
# log's last lines; exit status 2 for bad input, as the `fluxpipe` command itself.
onerror:
    fw.report_failures([str(f) for job in getattr(workflow.scheduler, "failed", ()) for f in job.log])


rule all:
    default_target: True
    input:
        VALIDATE_REPORT,
        fw.lora_output(CFG),
        rules.evaluate_samples.output.grid,
