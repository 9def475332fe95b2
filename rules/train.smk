# Training on the cached data: `fluxpipe train lora|full|controlnet` with the reference trainer's flags, one
# process per GPU under torchrun when train_processes > 1. A rerun after an interruption resumes from the
# newest state of the same settings and data. With train_segment_steps K a run is a chain of jobs of K steps
# (rule train_segment), each resuming the state the one before left; the last job is the rule below.


rule train_lora:
    input:
        report=validated,
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
        segment=last_segment("lora"),
    output:
        fw.lora_output(CFG),
    params:
        flags=fw.training_argv(CFG, "lora"),
        launcher=fw.train_launcher(CFG),
        cache_dir=lambda wildcards, input: fw.cache_root(input.latents),
        resume=resume_flag,
        settings=validated_settings(fw.train_params),
    threads: all_cores()
    resources:
        gpu=CFG.train_processes,
    log:
        "logs/train_lora.log",
    shell:
        "{params.launcher} train lora {params.flags:q} --cache_dir {params.cache_dir:q} {params.resume} > {log:q} 2>&1"


# Full fine-tuning (config.yaml's train_full:, flux_train.py's flags; FSDP2 across processes) and ControlNet
# training (train_controlnet:, flux_train_control_net.py's flags; the dataset needs conditioning_data_dir).
rule train_full:
    input:
        report=validated,
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
        segment=last_segment("full"),
    output:
        fw.method_output(CFG, "full"),
    params:
        flags=fw.training_argv(CFG, "full"),
        launcher=fw.train_launcher(CFG),
        cache_dir=lambda wildcards, input: fw.cache_root(input.latents),
        resume=resume_flag,
        settings=validated_settings(fw.train_params),
        impl=FLUXPIPE_VERSION,
    threads: all_cores()
    resources:
        gpu=CFG.train_processes,
    log:
        "logs/train_full.log",
    shell:
        "{params.launcher} train full {params.flags:q} --cache_dir {params.cache_dir:q} {params.resume} > {log:q} 2>&1"


rule train_controlnet:
    input:
        report=validated,
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
        segment=last_segment("controlnet"),
    output:
        fw.method_output(CFG, "controlnet"),
    params:
        flags=fw.training_argv(CFG, "controlnet"),
        launcher=fw.train_launcher(CFG),
        cache_dir=lambda wildcards, input: fw.cache_root(input.latents),
        resume=resume_flag,
        settings=validated_settings(fw.train_params),
        impl=FLUXPIPE_VERSION,
    threads: all_cores()
    resources:
        gpu=CFG.train_processes,
    log:
        "logs/train_controlnet.log",
    shell:
        "{params.launcher} train controlnet {params.flags:q} --cache_dir {params.cache_dir:q} {params.resume} > {log:q} 2>&1"


# One segment of a segmented run: train until step {end}, leave the state, exit. Temporary: Snakemake deletes
# a segment's state once the next job has resumed it and finished.
rule train_segment:
    input:
        report=validated,
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
        previous=lambda wc: fw.previous_segment(CFG, wc.method, int(wc.end)),
    output:
        temp(directory(fw.SEGMENT_STATE)),
    params:
        flags=lambda wc: fw.training_argv(CFG, wc.method),
        launcher=fw.train_launcher(CFG),
        cache_dir=lambda wildcards, input: fw.cache_root(input.latents),
        end=lambda wc: int(wc.end),
        settings=validated_settings(fw.train_params),
        resume=lambda wc, input: f"--resume {shlex.quote(input.previous[0])}" if input.previous else "",
        impl=FLUXPIPE_VERSION,
    threads: all_cores()
    resources:
        gpu=CFG.train_processes,
    log:
        "logs/train_{method}-{name}-seg{end}.log",
    shell:
        "{params.launcher} train {wildcards.method} {params.flags:q} --cache_dir {params.cache_dir:q} "
        "--stop_at_step {params.end} {params.resume} > {log:q} 2>&1"
