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


# The tiny Chroma DiT of the demo with train.model_type: chroma (random weights; the AE, T5 and tokenizers are
# the demo's above).
rule demo_chroma:
    output:
        fw.DEMO_CHROMA,
    params:
        out=lambda wildcards, output: fw.DEMO_DIR,
    threads: 1
    log:
        "logs/demo_chroma.log",
    shell:
        "fluxpipe demo-models --chroma {params.out:q} > {log:q} 2>&1"


# A checkpoint: once it ran, Snakemake re-plans the jobs after it by their own settings digests.
checkpoint validate_models:
    input:
        **fw.validate_inputs(CFG),
    output:
        VALIDATE_REPORT,
    params:
        # --flux FILE --ae FILE [--clip-l FILE] --t5xxl FILE (the input files; no CLIP-L for Chroma)
        files=fw.validate_files_argv(CFG),
        extra=fw.validate_args(CFG),
        impl=FLUXPIPE_VERSION,
    threads: 1
    log:
        "logs/validate_models.log",
    shell:
        "fluxpipe validate {params.files:q} {params.extra:q} --out {output:q} > {log:q} 2>&1"
