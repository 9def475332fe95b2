# Model files: the embedded demo models (used when config.yaml names no model file) and validation.


rule demo_models:
    output:
        fw.DEMO_OUTPUTS,
    params:
        out=lambda wildcards, output: fw.DEMO_DIR,
        impl=fw.DEMO_VERSION,
    threads: 1
    log:
        "logs/demo_models.log",
    shell:
        "fluxpipe demo-models --trained {params.out:q} > {log:q} 2>&1"


# A checkpoint: once it ran, Snakemake re-plans the jobs after it by their own settings digests.
checkpoint validate_models:
    input:
        **fw.validate_inputs(CFG),
    output:
        VALIDATE_REPORT,
    params:
        extra=fw.validate_args(CFG),
        impl=FLUXPIPE_VERSION,
    threads: 1
    log:
        "logs/validate_models.log",
    shell:
        "fluxpipe validate --flux {input.flux:q} --ae {input.ae:q} --clip-l {input.clip_l:q}"
        " --t5xxl {input.t5xxl:q} {params.extra:q} --out {output:q} > {log:q} 2>&1"
